//! Network gates: a route reachable only from listed source networks.

use std::net::IpAddr;

use ipnet::IpNet;

/// The networks a route accepts callers from.
#[derive(Debug, Clone)]
pub struct Gate {
    networks: Vec<IpNet>,
}

impl Gate {
    /// A gate allowing `networks`.
    pub fn new(networks: Vec<IpNet>) -> Gate {
        Gate { networks }
    }

    /// The networks.
    pub fn networks(&self) -> &[IpNet] {
        &self.networks
    }

    /// True when `ip` lies in one of the networks. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.networks.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_membership() {
        let g = Gate::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(g.allows("10.1.2.3".parse().unwrap()));
        assert!(g.allows("::ffff:10.1.2.3".parse().unwrap()));
        assert!(g.allows("::1".parse().unwrap()));
        assert!(!g.allows("127.0.0.1".parse().unwrap()));
        assert!(!g.allows("11.0.0.1".parse().unwrap()));
    }
}
