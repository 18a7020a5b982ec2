//! The client's address: the socket peer, unless that peer is a trusted proxy, then the
//! right-most address in `X-Forwarded-For` that is not itself a trusted proxy.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

impl TrustedProxies {
    /// Trusts `networks`.
    pub fn new(networks: Vec<IpNet>) -> Self {
        TrustedProxies { networks }
    }

    /// True when `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(&canonical(ip)))
    }

    /// The client address for a request from `peer`. A client cannot choose it: only the part
    /// of `X-Forwarded-For` appended by trusted proxies is read, right to left.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        // Right to left over every X-Forwarded-For header, in order.
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.trusts(client) {
                        return client;
                    }
                }
                // A hop that is not an address: stop at the last one we could believe.
                Err(_) => return client,
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so one client has one key.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Appends `ip` as text: IPv4 by hand (the formatting machinery costs ~1k instructions, on
/// every proxied request), IPv6 as `Display` writes it.
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(t.client(ip("1.2.3.4"), &xff(&["9.9.9.9"])), ip("1.2.3.4"));
        assert_eq!(
            TrustedProxies::default().client(ip("::ffff:1.2.3.4"), &xff(&[])),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn trusted_peer_right_most_untrusted_hop() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        // Client forged 6.6.6.6; the real client is 5.5.5.5, then two trusted hops.
        let h = xff(&["6.6.6.6, 5.5.5.5", "10.0.0.2"]);
        assert_eq!(t.client(ip("10.0.0.1"), &h), ip("5.5.5.5"));
        // All hops trusted: the left-most one.
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["10.0.0.3"])),
            ip("10.0.0.3")
        );
        // No header: the proxy itself.
        assert_eq!(t.client(ip("10.0.0.1"), &xff(&[])), ip("10.0.0.1"));
        // Garbage hop: stop before it.
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["junk, 10.0.0.4"])),
            ip("10.0.0.4")
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.199.255.9",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:1.2.3.4",
        ] {
            let mut out = b"x ".to_vec();
            write_ip(&mut out, ip(text));
            assert_eq!(out, format!("x {}", ip(text)).into_bytes(), "{text}");
        }
    }
}
