//! The client's address: the socket peer, unless that peer is a trusted proxy, then the
//! right-most address in `X-Forwarded-For` that is not itself a trusted proxy.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Who the client is, as far as the gateway can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// A known address.
    Ip(IpAddr),
    /// A trusted proxy forwarded a hop that is not an address (`unknown`, an obfuscated
    /// `_node` identifier): no network gate admits it, and its rate buckets are its own,
    /// never the proxy's. Holds the hop's text (at most [`MAX_HOP`] visible ASCII bytes).
    Unknown(Box<str>),
}

/// The address, or `unknown:<hop>` for a hop that is not one (logs, spans).
impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Ip(ip) => ip.fmt(f),
            Client::Unknown(hop) => write!(f, "unknown:{hop}"),
        }
    }
}

/// Longest hop text kept for an unknown client.
pub const MAX_HOP: usize = 64;

impl Client {
    /// The address, when there is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Client::Ip(ip) => Some(*ip),
            Client::Unknown(_) => None,
        }
    }

    /// Appends the key of this client's `ip` rate buckets: the address of its network of
    /// `prefixes` (IPv4, IPv6) bits, with `/bits` when shorter than a whole address, so that
    /// one IPv6 subscriber cannot spread over 2^64 buckets. Unknown clients get `?` and the
    /// hop text, a key no address can have.
    pub fn write_rate_key(&self, out: &mut Vec<u8>, prefixes: (u8, u8)) {
        match self {
            Client::Ip(IpAddr::V4(v4)) => {
                let bits = prefixes.0.min(32);
                let masked =
                    u32::from(*v4) & u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                write_ip(out, IpAddr::V4(masked.into()));
                if bits < 32 {
                    push_bits(out, bits);
                }
            }
            Client::Ip(IpAddr::V6(v6)) => {
                let bits = prefixes.1.min(128);
                let masked =
                    u128::from(*v6) & u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                write_ip(out, IpAddr::V6(masked.into()));
                if bits < 128 {
                    push_bits(out, bits);
                }
            }
            Client::Unknown(hop) => {
                out.push(b'?');
                out.extend_from_slice(hop.as_bytes());
            }
        }
    }
}

fn push_bits(out: &mut Vec<u8>, bits: u8) {
    out.push(b'/');
    out.extend_from_slice(itoa::Buffer::new().format(bits).as_bytes());
}

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
        !self.networks.is_empty() && self.networks.iter().any(|n| n.contains(&canonical(ip)))
    }

    /// The client of a request from `peer`. A client cannot choose it: only the part of
    /// `X-Forwarded-For` appended by trusted proxies is read, right to left, over every
    /// `X-Forwarded-For` line (several lines are one list, RFC 9110 5.3).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return Client::Ip(peer);
        }
        let mut client = peer;
        let lines: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        for hop in lines.iter().rev().flat_map(|v| v.rsplit(|&b| b == b',')) {
            match parse_hop(hop) {
                Some(ip) => {
                    client = canonical(ip);
                    if !self.trusts(client) {
                        return Client::Ip(client);
                    }
                }
                // A trusted proxy said the client is something that is not an address: the
                // client is unknown, not the proxy.
                None => return Client::Unknown(hop_text(hop)),
            }
        }
        Client::Ip(client)
    }
}

/// One `X-Forwarded-For` hop: an address, optionally quoted, optionally with a port
/// (`203.0.113.5:4444`, `[2001:db8::1]:443`, as some load balancers write them).
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim();
    let hop = hop
        .strip_prefix('"')
        .and_then(|h| h.strip_suffix('"'))
        .unwrap_or(hop);
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (addr, port) = rest.split_once(']')?;
        let port_ok = port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return port_ok
            .then(|| addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))
            .flatten();
    }
    let (addr, port) = hop.split_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A hop's text as a bounded key: visible ASCII only.
fn hop_text(hop: &[u8]) -> Box<str> {
    hop.trim_ascii()
        .iter()
        .filter(|b| b.is_ascii_graphic())
        .take(MAX_HOP)
        .map(|&b| b as char)
        .collect()
}

/// IPv4-mapped IPv6 addresses as IPv4, so one client has one key.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Appends `ip` as text: IPv4 octet by octet with `itoa` (the formatting machinery costs ~1k
/// instructions, on every proxied request), IPv6 as `Display` writes it.
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
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

    fn at(s: &str) -> Client {
        Client::Ip(ip(s))
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(t.client(ip("1.2.3.4"), &xff(&["9.9.9.9"])), at("1.2.3.4"));
        assert_eq!(
            TrustedProxies::default().client(ip("::ffff:1.2.3.4"), &xff(&[])),
            at("1.2.3.4")
        );
    }

    #[test]
    fn trusted_peer_right_most_untrusted_hop_over_every_line() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        // Client forged 6.6.6.6; the real client is 5.5.5.5, then two trusted hops.
        let h = xff(&["6.6.6.6, 5.5.5.5", "10.0.0.2"]);
        assert_eq!(t.client(ip("10.0.0.1"), &h), at("5.5.5.5"));
        // All hops trusted: the left-most one.
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["10.0.0.3"])),
            at("10.0.0.3")
        );
        // No header: the proxy itself.
        assert_eq!(t.client(ip("10.0.0.1"), &xff(&[])), at("10.0.0.1"));
        // The second line is read too.
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["10.0.0.9", "7.7.7.7"])),
            at("7.7.7.7")
        );
    }

    #[test]
    fn hops_with_ports_and_quotes_are_addresses() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        for (hop, want) in [
            ("203.0.113.5:4444", "203.0.113.5"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("\"203.0.113.5\"", "203.0.113.5"),
            (" 203.0.113.5 ", "203.0.113.5"),
        ] {
            assert_eq!(t.client(ip("10.0.0.1"), &xff(&[hop])), at(want), "{hop}");
        }
    }

    #[test]
    fn a_hop_that_is_no_address_is_an_unknown_client_never_the_proxy() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        for hop in [
            "unknown",
            "_hidden",
            "1.2.3.4:99999",
            "[::1",
            "junk, 10.0.0.4",
            "::1:x",
        ] {
            let c = t.client(ip("10.0.0.1"), &xff(&[hop]));
            let ok = matches!(c, Client::Unknown(_)) || c == at("10.0.0.4");
            assert!(ok, "{hop}: {c:?}");
            assert_ne!(c, at("10.0.0.1"), "{hop}");
        }
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["unknown"])),
            Client::Unknown("unknown".into())
        );
        // Left of an untrusted address nothing is read.
        assert_eq!(
            t.client(ip("10.0.0.1"), &xff(&["unknown, 5.5.5.5"])),
            at("5.5.5.5")
        );
    }

    #[test]
    fn rate_keys_cover_a_network() {
        let key = |c: Client, p: (u8, u8)| {
            let mut out = Vec::new();
            c.write_rate_key(&mut out, p);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(key(at("1.2.3.4"), (32, 64)), "1.2.3.4");
        assert_eq!(key(at("1.2.3.4"), (24, 64)), "1.2.3.0/24");
        assert_eq!(
            key(at("2001:db8:1:2:aaaa::1"), (32, 64)),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            key(at("2001:db8:1:2:ffff:ffff:ffff:ffff"), (32, 64)),
            "2001:db8:1:2::/64"
        );
        assert_eq!(key(at("2001:db8::1"), (32, 128)), "2001:db8::1");
        assert_eq!(key(at("2001:db8::1"), (32, 1)), "::/1");
        assert_eq!(key(Client::Unknown("unknown".into()), (32, 64)), "?unknown");
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
