//! MMDS version 2 session tokens: `PUT /latest/api/token` with a lifetime gives the guest a
//! token, and each later request shows it. A token is 32 random bytes from the host's
//! `getrandom` (hex), kept with its expiry in a bounded table: nothing about it can be
//! guessed or forged, and nothing outlives this monitor (a restored VM asks anew, as with
//! Firecracker, whose key is new in each process).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::random::getrandom;

/// Firecracker's bounds on a token's lifetime, in seconds.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21600;
/// Live tokens kept at once; the one expiring first makes room for a new one.
const MAX_TOKENS: usize = 1024;
const TOKEN_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Firecracker's words.
    #[error("Invalid time to live value provided for token: {0}. Please provide a value between {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}.")]
    InvalidTtl(u32),
    #[error("cannot draw a random token: {0}")]
    Random(String),
}

#[derive(Debug, Default)]
pub struct TokenAuthority {
    expiries: HashMap<String, Instant>,
}

impl TokenAuthority {
    /// A new token valid for `ttl_seconds` from `now`.
    pub fn generate(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom(&mut bytes).map_err(|err| TokenError::Random(err.to_string()))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.expiries.retain(|_, expiry| *expiry > now);
        if self.expiries.len() >= MAX_TOKENS {
            let first = self
                .expiries
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(token, _)| token.clone());
            if let Some(first) = first {
                self.expiries.remove(&first);
            }
        }
        self.expiries.insert(
            token.clone(),
            now + Duration::from_secs(u64::from(ttl_seconds)),
        );
        Ok(token)
    }

    /// Whether `token` was given out here and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        self.expiries.get(token).is_some_and(|expiry| *expiry > now)
    }

    /// Forgets every token (a new MMDS version, a restore).
    pub fn clear(&mut self) {
        self.expiries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_valid_until_its_ttl_passes() {
        let mut authority = TokenAuthority::default();
        let now = Instant::now();
        let token = authority.generate(2, now).unwrap();
        assert_eq!(token.len(), 64);
        assert!(authority.is_valid(&token, now));
        assert!(authority.is_valid(&token, now + Duration::from_millis(1999)));
        assert!(!authority.is_valid(&token, now + Duration::from_secs(2)));
        let other = authority.generate(2, now).unwrap();
        assert_ne!(token, other);
    }

    #[test]
    fn bad_tokens_and_ttls_are_refused() {
        let mut authority = TokenAuthority::default();
        let now = Instant::now();
        assert!(!authority.is_valid("", now));
        assert!(!authority.is_valid("00", now));
        for ttl in [0, MAX_TOKEN_TTL_SECONDS + 1] {
            let err = authority.generate(ttl, now).unwrap_err();
            assert_eq!(err, TokenError::InvalidTtl(ttl));
            assert!(err.to_string().contains("between 1 and 21600"), "{err}");
        }
        let token = authority.generate(MAX_TOKEN_TTL_SECONDS, now).unwrap();
        assert!(!authority.is_valid(&token.to_uppercase(), now));
        authority.clear();
        assert!(!authority.is_valid(&token, now));
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut authority = TokenAuthority::default();
        let now = Instant::now();
        let first = authority.generate(1, now).unwrap();
        for _ in 0..MAX_TOKENS {
            authority.generate(100, now).unwrap();
        }
        assert_eq!(authority.expiries.len(), MAX_TOKENS);
        // The one expiring first made room.
        assert!(!authority.is_valid(&first, now));
    }
}
