//! Client address allow-lists (`tgtipmask`, `jobstateipmask`).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A list of CIDR blocks, IPv4 and IPv6. An address is allowed when any block
/// contains it; a `/32` or `/128` block allows exactly its own address (the
/// original rejected those, a bug).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct IpMaskList {
    nets: Vec<IpNet>,
}

impl IpMaskList {
    /// Parses CIDR strings. A block with host bits set (`10.1.1.1/24`) is
    /// refused rather than silently truncated: it almost always hides a typo.
    /// A bare address counts as a single-host block.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        let mut nets = Vec::with_capacity(items.len());
        for item in items {
            let text = item.as_ref().trim();
            let net = if text.contains('/') {
                text.parse::<IpNet>()
                    .map_err(|_| format!("`{text}` is not a CIDR block"))?
            } else {
                let addr: IpAddr = text
                    .parse()
                    .map_err(|_| format!("`{text}` is not an IP address or CIDR block"))?;
                IpNet::from(addr)
            };
            if net.trunc() != net {
                return Err(format!(
                    "`{text}` has host bits set; did you mean `{}`?",
                    net.trunc()
                ));
            }
            nets.push(net);
        }
        Ok(IpMaskList { nets })
    }

    /// Parses the whitespace-separated form of the container-era variables.
    pub fn parse_words(text: &str) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        Self::parse(&words)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical_ip(addr);
        self.nets.iter().any(|net| net.contains(&addr))
    }

    pub fn len(&self) -> usize {
        self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// The configuration file's form: a list of CIDR strings.
impl TryFrom<Vec<String>> for IpMaskList {
    type Error = String;

    fn try_from(items: Vec<String>) -> Result<Self, String> {
        Self::parse(&items)
    }
}

/// Space-separated, as the original printed its masks in error messages.
impl fmt::Display for IpMaskList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// Folds IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a dual-stack listener
/// reports for an IPv4 peer) to plain IPv4, so masks and stored hosts agree.
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn single_host_blocks_allow_their_own_address() {
        let masks = IpMaskList::parse(&["132.249.1.1/32", "2001:db8::7/128"]).unwrap();
        assert!(masks.contains(ip("132.249.1.1")));
        assert!(masks.contains(ip("2001:db8::7")));
        assert!(!masks.contains(ip("132.249.1.2")));
    }

    #[test]
    fn host_bits_are_refused_with_a_suggestion() {
        let err = IpMaskList::parse(&["10.1.1.1/24"]).unwrap_err();
        assert_eq!(
            err,
            "`10.1.1.1/24` has host bits set; did you mean `10.1.1.0/24`?"
        );
    }

    #[test]
    fn mapped_ipv4_matches_ipv4_blocks() {
        let masks = IpMaskList::parse_words("10.21.0.0/16  198.202.100.8/29").unwrap();
        assert!(masks.contains(ip("::ffff:10.21.3.4")));
        assert!(masks.contains(ip("198.202.100.15")));
        assert!(!masks.contains(ip("198.202.100.16")));
        assert_eq!(masks.to_string(), "10.21.0.0/16 198.202.100.8/29");
    }

    #[test]
    fn junk_is_refused() {
        assert!(IpMaskList::parse(&["10.0.0.0/33"]).is_err());
        assert!(IpMaskList::parse(&["example.org"]).is_err());
    }
}
