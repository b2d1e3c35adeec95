//! Tokens (aliases): drawing them from the EFF large word list, checking their
//! shape, and the hash that the database stores them under.
//!
//! Entropy: each word is drawn uniformly and independently from the 7772
//! usable words of the EFF large list (4 of its 7776 entries hold a hyphen
//! and are skipped), so a 3-word token carries 3 × log2(7772) ≈ 38.8 bits,
//! a 4-word token ≈ 51.7 bits. The token is also a public DNS label, so it
//! is a bearer secret of modest strength: keep `ttl_secs` reasonable.

use std::path::Path;

use base64::Engine;
use rand::RngExt;
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// The longest a DNS label may be (RFC 1035); a token must fit in one.
pub const MAX_LABEL_LEN: usize = 63;

/// The usable words of a word list, in file order.
#[derive(Clone, Debug)]
pub struct Wordlist {
    words: Vec<String>,
}

impl Wordlist {
    /// Reads a list in either the diceware form (`11111<TAB>abacus`) or the
    /// bare form (one word a line). Words outside `[a-z0-9]+` after
    /// lower-casing are skipped, as the original did.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|err| CoreError::Wordlist {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        let text = String::from_utf8_lossy(&text);
        let words: Vec<String> = text.lines().filter_map(usable_word).collect();
        if words.len() < 1024 {
            return Err(CoreError::Wordlist {
                path: path.to_owned(),
                message: format!(
                    "only {} usable words (at least 1024 are needed for tokens worth the name)",
                    words.len()
                ),
            });
        }
        Ok(Wordlist { words })
    }

    pub fn from_words<I: IntoIterator<Item = S>, S: AsRef<str>>(words: I) -> Self {
        Wordlist {
            words: words
                .into_iter()
                .filter_map(|w| usable_word(w.as_ref()))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Bits of entropy of a token of `words_per_token` words.
    pub fn entropy_bits(&self, words_per_token: usize) -> f64 {
        words_per_token as f64 * (self.words.len() as f64).log2()
    }

    /// Draws a token: `words_per_token` words joined with `-`, each chosen
    /// uniformly by the thread's CSPRNG (ChaCha seeded from the OS).
    pub fn draw_alias(&self, words_per_token: usize) -> String {
        let mut rng = rand::rng();
        let mut alias = String::with_capacity(words_per_token * 10);
        for i in 0..words_per_token {
            if i > 0 {
                alias.push('-');
            }
            let word = &self.words[rng.random_range(0..self.words.len())];
            alias.push_str(word);
        }
        alias
    }
}

fn usable_word(line: &str) -> Option<String> {
    let word = line.split_whitespace().last()?.to_ascii_lowercase();
    let usable = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    usable.then_some(word)
}

/// `sha256_base64` of the original: standard Base64 alphabet, no padding,
/// always 43 characters. Rows are looked up by this value.
pub fn alias_compare_hash(alias: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(alias))
}

/// What the logs name a token by: a keyed HMAC of its stored hash (see
/// `logid`), or `-` when this process has no log key.
pub fn log_id(alias_hash: &str) -> String {
    crate::logid::log_id(alias_hash)
}

/// The shape every alias written into Apache's configuration must have:
/// `^[a-z0-9]+(-[a-z0-9]+)*$`, at most one DNS label long.
pub fn is_valid_alias(alias: &str) -> bool {
    !alias.is_empty()
        && alias.len() <= MAX_LABEL_LEN
        && alias.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_the_perl_digest() {
        // sha256_base64("abacus-zoom-apple") as computed by Digest::SHA.
        assert_eq!(
            alias_compare_hash(b"abacus-zoom-apple"),
            "rzHcAFoDUY57/56CDfejvs5gGapdB3W+5sypjx3ht9o"
        );
    }

    #[test]
    fn both_list_formats_are_read_and_hyphenated_words_skipped() {
        let list =
            Wordlist::from_words(["11111\tabacus", "Zoom", "24255\tdrop-down", "", "t-shirt"]);
        assert_eq!(list.words, ["abacus", "zoom"]);
    }

    #[test]
    fn drawn_aliases_are_valid_labels() {
        let list = Wordlist::from_words(["alpha", "beta", "gamma9"]);
        for _ in 0..100 {
            let alias = list.draw_alias(3);
            assert!(is_valid_alias(&alias), "{alias}");
            assert_eq!(alias.split('-').count(), 3);
        }
    }

    #[test]
    fn alias_shape() {
        assert!(is_valid_alias("elixir-sworn-overuse"));
        assert!(!is_valid_alias("Elixir-sworn"));
        assert!(!is_valid_alias("a--b"));
        assert!(!is_valid_alias("-a"));
        assert!(!is_valid_alias("a.b"));
        assert!(!is_valid_alias(&"a".repeat(64)));
    }
}
