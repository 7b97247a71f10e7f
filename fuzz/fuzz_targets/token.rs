//! IMDSv2 session tokens (`TokenKey::mint` / `verify`).
//!
//! The whole input is presented as a token for a fixed key and subject:
//! verify must never panic, and may accept only what the key itself mints
//! for that subject (byte for byte: no second spelling of a token). The
//! input's first 16 bytes (ttl, now) and the rest (subject) also drive a
//! mint -> verify round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaproxy::surface::{TokenError, TokenKey};

const KEY: [u8; 32] = [7; 32];
/// A container id, as the daemon uses for the subject.
const SUBJECT: &str = "abababababababababababababababababababababababababababababababab";
const NOW: u64 = 1000;

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::from_bytes(KEY);

    if let Ok(token) = std::str::from_utf8(data) {
        if key.verify(token, SUBJECT, NOW).is_ok() {
            let expiry: u64 = token
                .split('.')
                .nth(1)
                .and_then(|e| e.parse().ok())
                .expect("an accepted token has an expiry");
            assert!(expiry > NOW, "expired token accepted: {token:?}");
            let minted = key.mint(SUBJECT, expiry - NOW, NOW);
            assert_eq!(token, minted, "accepted a token the key did not mint");
        }
        // Never for another subject.
        assert!(key.verify(token, "someone-else", NOW).is_err());
    }

    if data.len() >= 16 {
        let ttl = u64::from_le_bytes(data[..8].try_into().unwrap());
        let now = u64::from_le_bytes(data[8..16].try_into().unwrap());
        let subject = String::from_utf8_lossy(&data[16..]);
        let Some(expiry) = now.checked_add(ttl) else {
            return;
        };
        let token = key.mint(&subject, ttl, now);
        if ttl > 0 {
            assert_eq!(key.verify(&token, &subject, now), Ok(()));
            assert_eq!(key.verify(&token, &subject, expiry - 1), Ok(()));
        }
        assert_eq!(
            key.verify(&token, &subject, expiry),
            Err(TokenError::Expired)
        );
        let other = format!("{subject}x");
        assert_eq!(
            key.verify(&token, &other, now),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            TokenKey::from_bytes([8; 32]).verify(&token, &subject, now),
            Err(TokenError::BadSignature)
        );
    }
});
