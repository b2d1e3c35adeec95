//! Log ids: what logs call a token by. An HMAC-SHA256 under a secret key
//! (`logkey`, 32 random bytes that `satellite init` writes), so a log
//! reader cannot test guesses against an id the way 10 characters of the
//! plain SHA-256 allowed (two words known: a few thousand hashes). Without
//! the key file no id is logged at all: a keyless id would be reversible.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Bytes in a key file.
pub const KEY_LEN: usize = 32;
/// Characters of the HMAC kept in a log line (72 bits).
const ID_LEN: usize = 12;
/// What a line says instead of an id when there is no key.
pub const NO_ID: &str = "-";

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogKeyError {
    #[error("{path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds {len} bytes, not {KEY_LEN}")]
    WrongLength { path: PathBuf, len: usize },
    #[error("{path} is readable or writable by others (mode {mode:o})")]
    TooOpen { path: PathBuf, mode: u32 },
}

/// Reads and checks a key file: exactly 32 bytes, no access for others and
/// no group write (the group is the web server's).
pub fn read_key(path: &Path) -> Result<[u8; KEY_LEN], LogKeyError> {
    let unreadable = |source| LogKeyError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(unreadable)?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o027 != 0 {
        return Err(LogKeyError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| LogKeyError::WrongLength {
            path: path.to_owned(),
            len: bytes.len(),
        })
}

/// 32 fresh random bytes for a new key file.
pub fn new_key() -> [u8; KEY_LEN] {
    use rand::RngExt;
    let mut key = [0u8; KEY_LEN];
    rand::rng().fill(&mut key);
    key
}

/// Where this process's key is, and the key once a line has needed it.
struct KeySource {
    path: PathBuf,
    /// `None` until the first id; then the key, or `None` if unusable.
    key: Option<Option<[u8; KEY_LEN]>>,
}

static KEY: Mutex<Option<KeySource>> = Mutex::new(None);

/// Makes `log_id` use the key in `path`. The file is read when the first
/// id is needed (once per process and path), so a request that logs
/// nothing (a waiting page's poll) costs no file access. A missing or
/// unusable file means ids are left out of log lines.
pub fn use_key(path: &Path) {
    let Ok(mut current) = KEY.lock() else { return };
    if current.as_ref().is_some_and(|source| source.path == path) {
        return;
    }
    *current = Some(KeySource {
        path: path.to_owned(),
        key: None,
    });
}

/// The log id of the token whose stored hash is `alias_hash`: the HMAC of
/// that hash (itself the SHA-256 of the token) under the key, or `-` when
/// there is no key.
pub fn log_id(alias_hash: &str) -> String {
    let key = KEY.lock().ok().and_then(|mut current| {
        let source = current.as_mut()?;
        *source
            .key
            .get_or_insert_with(|| read_key(&source.path).ok())
    });
    match key {
        Some(key) => id_under(&key, alias_hash),
        None => NO_ID.to_owned(),
    }
}

/// The id of `alias_hash` under `key` (for `log_id` and for admins mapping
/// a token to its id).
pub fn id_under(key: &[u8; KEY_LEN], alias_hash: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return NO_ID.to_owned();
    };
    mac.update(alias_hash.as_bytes());
    let tag = mac.finalize().into_bytes();
    let mut id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag);
    id.truncate(ID_LEN);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::alias_compare_hash;

    #[test]
    fn ids_depend_on_the_key_and_never_contain_the_plain_hash() {
        let hash = alias_compare_hash(b"able-acorn-zoo");
        let one = id_under(&[1; KEY_LEN], &hash);
        let two = id_under(&[2; KEY_LEN], &hash);
        assert_eq!(one.len(), ID_LEN);
        assert_ne!(one, two);
        assert_eq!(one, id_under(&[1; KEY_LEN], &hash));
        assert!(!hash.contains(&one) && !hash.starts_with(&one[..4]));
    }

    #[test]
    fn a_key_file_must_be_32_private_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logkey");
        assert!(matches!(
            read_key(&path),
            Err(LogKeyError::Unreadable { .. })
        ));
        std::fs::write(&path, [7u8; 31]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_key(&path),
            Err(LogKeyError::WrongLength { len: 31, .. })
        ));
        std::fs::write(&path, [7u8; 32]).unwrap();
        assert_eq!(read_key(&path).unwrap(), [7u8; 32]);
        for open in [0o644, 0o660, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open)).unwrap();
            assert!(
                matches!(read_key(&path), Err(LogKeyError::TooOpen { .. })),
                "{open:o}"
            );
        }
    }
}
