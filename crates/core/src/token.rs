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

/// Fewer words than this make tokens too easy to guess to be worth the name
/// (3 words of 1024 are 30 bits).
pub const MIN_WORDS: usize = 1024;

/// The usable words of a word list, in file order: at least [`MIN_WORDS`]
/// of them, so drawing from it always has something to draw.
#[derive(Clone, Debug)]
pub struct Wordlist {
    words: Vec<String>,
}

impl Wordlist {
    /// Reads a list in either the diceware form (`11111<TAB>abacus`) or the
    /// bare form (one word a line). Words outside `[a-z0-9]+` after
    /// lower-casing are skipped, as the original did.
    ///
    /// # Errors
    /// [`CoreError::Wordlist`] when the file cannot be read or holds fewer
    /// than [`MIN_WORDS`] usable words.
    pub fn load(path: &Path) -> Result<Self> {
        let refused = |message: String| CoreError::Wordlist {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read(path).map_err(|err| refused(err.to_string()))?;
        Self::from_words(String::from_utf8_lossy(&text).lines())
            .map_err(|err| refused(err.to_string()))
    }

    /// The usable words of `words`, in either form [`Wordlist::load`] reads.
    ///
    /// # Errors
    /// [`CoreError::TooFewWords`] when fewer than [`MIN_WORDS`] are usable.
    pub fn from_words<I: IntoIterator<Item = S>, S: AsRef<str>>(words: I) -> Result<Self> {
        let words: Vec<String> = words
            .into_iter()
            .filter_map(|w| usable_word(w.as_ref()))
            .collect();
        if words.len() < MIN_WORDS {
            return Err(CoreError::TooFewWords {
                usable: words.len(),
                needed: MIN_WORDS,
            });
        }
        Ok(Wordlist { words })
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Always false: the constructors refuse short lists.
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
        // A token fits a DNS label; no arithmetic on the caller's count.
        let mut alias = String::with_capacity(MAX_LABEL_LEN);
        for i in 0..words_per_token {
            if i > 0 {
                alias.push('-');
            }
            // The range is never empty (the constructors refuse short lists)
            // and always inside the list, so neither call can panic.
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

/// What the logs name a token by: enough of its stored hash for an admin to
/// find the row (`WHERE alias_compare_hash LIKE '<prefix>%'`), too little to
/// redeem anything.
pub fn log_id(alias_hash: &str) -> &str {
    &alias_hash[..alias_hash.len().min(10)]
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

    /// The EFF list the product ships.
    fn eff_list() -> Wordlist {
        Wordlist::from_words(include_str!("../../../wordlist/eff_large_wordlist.txt").lines())
            .unwrap()
    }

    fn numbered_words(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn both_list_formats_are_read_and_hyphenated_words_skipped() {
        let mut lines = vec!["11111\tabacus", "Zoom", "24255\tdrop-down", "", "t-shirt"];
        let filler = numbered_words(MIN_WORDS);
        lines.extend(filler.iter().map(String::as_str));
        let list = Wordlist::from_words(lines).unwrap();
        assert_eq!(list.words[..2], ["abacus", "zoom"]);
        assert_eq!(list.len(), MIN_WORDS + 2);
    }

    #[test]
    fn an_empty_or_short_list_is_refused() {
        let no_words: [&str; 0] = [];
        for (words, usable) in [
            (numbered_words(0), 0),
            (numbered_words(MIN_WORDS - 1), MIN_WORDS - 1),
            (vec!["drop-down".to_owned(); MIN_WORDS], 0),
        ] {
            let err = Wordlist::from_words(&words).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("only {usable} usable words (at least 1024 are needed for tokens worth the name)")
            );
        }
        assert!(Wordlist::from_words(no_words).is_err());
        assert!(Wordlist::from_words(numbered_words(MIN_WORDS)).is_ok());
    }

    #[test]
    fn a_list_of_the_smallest_size_draws_from_every_word() {
        let list = Wordlist::from_words(numbered_words(MIN_WORDS)).unwrap();
        let mut seen = std::collections::HashSet::new();
        // 40,000 draws miss one of 1024 words with probability 1024·e^-39.
        for _ in 0..40_000 {
            seen.insert(list.draw_alias(1));
        }
        assert_eq!(seen.len(), MIN_WORDS);
        assert_eq!(list.draw_alias(0), "");
    }

    #[test]
    fn many_drawn_aliases_are_distinct_valid_labels_of_listed_words() {
        let list = eff_list();
        assert_eq!(list.len(), 7772);
        let words: std::collections::HashSet<&str> =
            list.words.iter().map(String::as_str).collect();
        let mut aliases = std::collections::HashSet::new();
        let mut used = std::collections::HashSet::new();
        // 4-word aliases (51.7 bits): 100,000 of them collide with
        // probability ~1e-6, so a repeat means a broken generator.
        for _ in 0..100_000 {
            let alias = list.draw_alias(4);
            assert!(is_valid_alias(&alias), "{alias}");
            for word in alias.split('-') {
                assert!(words.contains(word), "{word} of {alias}");
                used.insert(word.to_owned());
            }
            assert!(aliases.insert(alias.clone()), "{alias} drawn twice");
        }
        // 400,000 word draws miss one of 7772 words with probability
        // 7772·e^-51: every word is reachable.
        assert_eq!(used.len(), 7772);
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
