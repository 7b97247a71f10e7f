//! The two ends of an accepted connection, as distinct types: a lookup that
//! takes an [`AddrPair`] cannot have its arguments swapped. And the one
//! codec between addresses and the kernel's layout (network-order words),
//! both ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use metaproxy_common::{ConnKey, AF_INET, AF_INET6};

/// The client's end, as `accept()` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The daemon's end (the listen address the probe rewrote the connect to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerAddr(pub SocketAddr);

/// One accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrPair {
    pub client: ClientAddr,
    pub server: ServerAddr,
}

impl AddrPair {
    pub fn new(client: ClientAddr, server: ServerAddr) -> Self {
        Self { client, server }
    }

    /// The probe's map key for this connection (see
    /// [`ConnKey::new`], shared with the kernel).
    pub fn conn_key(&self) -> Option<ConnKey> {
        let (cf, ca, cp) = words(self.client.0);
        let (sf, sa, sp) = words(self.server.0);
        if cf != sf {
            return None;
        }
        ConnKey::new(cf, ca, cp, sa, sp)
    }
}

/// A socket address in the kernel's layout: family, four network-order
/// words (IPv4 in word 0), port in host order.
fn words(addr: SocketAddr) -> (u16, [u32; 4], u16) {
    match addr.ip() {
        IpAddr::V4(ip) => (AF_INET, [ip4_word(ip), 0, 0, 0], addr.port()),
        IpAddr::V6(ip) => (AF_INET6, ip6_words(ip), addr.port()),
    }
}

/// An IPv4 address as one network-order word, the kernel's layout.
pub fn ip4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// An IPv6 address as four network-order words, the kernel's layout.
pub fn ip6_words(ip: Ipv6Addr) -> [u32; 4] {
    let octets = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// An address of `family` in the kernel's layout, back as an address.
pub fn ip_from_words(family: u16, words: [u32; 4]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(c: &str, s: &str) -> AddrPair {
        AddrPair::new(
            ClientAddr(c.parse().unwrap()),
            ServerAddr(s.parse().unwrap()),
        )
    }

    #[test]
    fn keys_match_the_kernel_layout() {
        let key = pair("10.1.2.3:40000", "169.254.170.254:8169")
            .conn_key()
            .unwrap();
        assert_eq!(
            key.client_addr,
            [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0]
        );
        assert_eq!(key.server_addr[0], u32::from_ne_bytes([169, 254, 170, 254]));
        assert_eq!((key.client_port, key.server_port), (40000, 8169));
        // A v4 client on a dual-stack listener shows up mapped; the kernel
        // keyed it as plain v4.
        let mapped = pair("[::ffff:10.1.2.3]:40000", "[::ffff:169.254.170.254]:8169").conn_key();
        assert_eq!(mapped, Some(key));
        assert_eq!(pair("10.1.2.3:1", "[::1]:2").conn_key(), None);
        let v6 = pair("[fd00::2]:1", "[fd00::1]:2").conn_key().unwrap();
        assert_eq!(v6.family, AF_INET6);
        // And back.
        assert_eq!(
            ip_from_words(key.family, key.client_addr),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ip_from_words(v6.family, v6.client_addr),
            "fd00::2".parse::<IpAddr>().unwrap()
        );
    }
}
