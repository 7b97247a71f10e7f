//! IMDSv2 session tokens, bound to the container that asked for them.
//!
//! A token is `MP1.<expiry>.<mac>`, where the MAC (HMAC-SHA256 under a key
//! kept in the state directory) covers the expiry and the caller's identity
//! (its container id). A token presented by another container fails the MAC
//! check; a restarted daemon reads the same key, so tokens SDKs cached stay
//! valid (aws-config keeps its token for hours).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

const PREFIX: &str = "MP1";
const KEY_FILE: &str = "token.key";

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed")]
    Malformed,
    #[error("expired")]
    Expired,
    /// Minted for someone else, or forged.
    #[error("minted for another caller, or forged")]
    BadSignature,
}

/// The token signing key.
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// Reads the key from `state_dir`, creating the directory (0700) and a
    /// fresh random key (0600) the first time.
    pub fn load_or_create(state_dir: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        let path = state_dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.try_into().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} is not a 32-byte key", path.display()),
                    )
                })?;
                Ok(Self(key))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(io::Error::other)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(Self(key))
            }
            Err(e) => Err(e),
        }
    }

    /// A key from known bytes (tests; a fixed key across daemons).
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The MAC over `PREFIX|expiry|subject` (`expiry` in decimal), fed in
    /// pieces (no allocation on the request path).
    fn hmac(&self, expiry: &str, subject: &str) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length works for HMAC");
        mac.update(PREFIX.as_bytes());
        mac.update(b"|");
        mac.update(expiry.as_bytes());
        mac.update(b"|");
        mac.update(subject.as_bytes());
        mac
    }

    /// A token for `subject` valid `ttl` seconds from `now` (unix seconds).
    pub fn mint(&self, subject: &str, ttl: u64, now: u64) -> String {
        let expiry = (now + ttl).to_string();
        let mac = self.hmac(&expiry, subject).finalize().into_bytes();
        format!("{PREFIX}.{expiry}.{}", URL_SAFE_NO_PAD.encode(mac))
    }

    /// Checks `token` for `subject` at `now`.
    pub fn verify(&self, token: &str, subject: &str, now: u64) -> Result<(), TokenError> {
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(expiry), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        // One spelling per token: `01060` or `+1060` would parse to the
        // same expiry (found by the `token` fuzz target). Only the digits
        // `mint` writes are accepted, and they are what the MAC covers.
        let canonical = expiry.bytes().all(|b| b.is_ascii_digit())
            && (expiry == "0" || !expiry.starts_with('0'));
        if !canonical {
            return Err(TokenError::Malformed);
        }
        let expiry_text = expiry;
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        // A SHA-256 MAC is 32 bytes, 43 characters unpadded: anything
        // longer is not ours.
        let mut raw = [0u8; 33];
        let n = URL_SAFE_NO_PAD
            .decode_slice(mac, &mut raw)
            .map_err(|_| TokenError::Malformed)?;
        self.hmac(expiry_text, subject)
            .verify_slice(&raw[..n])
            .map_err(|_| TokenError::BadSignature)?;
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_their_subject_and_expire() {
        let key = TokenKey::from_bytes([7; 32]);
        let t = key.mint("container-a", 60, 1000);
        assert_eq!(key.verify(&t, "container-a", 1000), Ok(()));
        assert_eq!(key.verify(&t, "container-a", 1059), Ok(()));
        assert_eq!(
            key.verify(&t, "container-a", 1060),
            Err(TokenError::Expired)
        );
        assert_eq!(
            key.verify(&t, "container-b", 1000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            TokenKey::from_bytes([8; 32]).verify(&t, "container-a", 1000),
            Err(TokenError::BadSignature)
        );
        // Extending the expiry breaks the MAC.
        let forged = t.replacen("1060", "9999", 1);
        assert_eq!(
            key.verify(&forged, "container-a", 1000),
            Err(TokenError::BadSignature)
        );
        // Another spelling of the same expiry is not the same token.
        let expiry = t.split('.').nth(1).unwrap().to_string();
        for respelled in [format!("0{expiry}"), format!("+{expiry}")] {
            let other = t.replacen(&expiry, &respelled, 1);
            assert_eq!(
                key.verify(&other, "container-a", 1000),
                Err(TokenError::Malformed),
                "{other}"
            );
        }
        for junk in [
            "",
            "MP1",
            "MP1.x.y",
            "MP1.1060",
            "AQAE.1.abc",
            &format!("{t}.x"),
        ] {
            assert!(key.verify(junk, "container-a", 1000).is_err(), "{junk}");
        }
    }

    #[test]
    fn the_key_survives_a_restart() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("state");
        let t = TokenKey::load_or_create(&dir).unwrap().mint("c", 100, 0);
        assert_eq!(
            TokenKey::load_or_create(&dir).unwrap().verify(&t, "c", 1),
            Ok(())
        );
    }
}
