//! Query strings and form bodies, parsed as Perl's CGI.pm did: `&` and `;`
//! separate pairs, `+` is a space, `%XX` is decoded (an invalid escape is
//! kept as written), and the first value of a repeated name wins. Values
//! are bytes: nothing a client sends has to be valid UTF-8.

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Params {
    pub fn parse(input: &[u8]) -> Self {
        let pairs = input
            .split(|&b| b == b'&' || b == b';')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.iter().position(|&b| b == b'=') {
                Some(eq) => (decode(&pair[..eq]), decode(&pair[eq + 1..])),
                None => (decode(pair), Vec::new()),
            })
            .collect();
        Params { pairs }
    }

    /// The first value given for `name`; an empty one counts as missing.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(key, _)| key == name.as_bytes())
            .map(|(_, value)| value.as_slice())
            .filter(|value| !value.is_empty())
    }
}

/// Decodes `+` and `%XX`.
pub fn decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < input.len() => {
                match (hex_value(input[i + 1]), hex_value(input[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_pm_semantics() {
        let p = Params::parse(b"token=a%2Db+c;port=8888&token=second&empty=&flag");
        assert_eq!(p.get("token"), Some(&b"a-b c"[..]));
        assert_eq!(p.get("port"), Some(&b"8888"[..]));
        assert_eq!(p.get("empty"), None);
        assert_eq!(p.get("flag"), None);
        assert_eq!(p.get("missing"), None);
    }

    #[test]
    fn bad_escapes_are_kept_and_bytes_survive() {
        assert_eq!(decode(b"%zz%4"), b"%zz%4");
        assert_eq!(decode(b"%00%ff%"), vec![0, 0xff, b'%']);
        let p = Params::parse(b"token=x\\&jobid=1");
        assert_eq!(p.get("token"), Some(&b"x\\"[..]));
        assert_eq!(p.get("jobid"), Some(&b"1"[..]));
    }
}
