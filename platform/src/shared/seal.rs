//! Sealing: every shared entry is encrypted and authenticated
//! (AES-256-GCM) under the replicas' one key, bound to the Redis key it is
//! stored under, so an entry copied to another key or sealed under another
//! key never opens.

use std::fmt;
use std::io::Read;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rand::Rng;
use zeroize::Zeroizing;

/// The sealing key file's size cap (64 hex digits and a newline, loosely).
const MAX_KEY_FILE_BYTES: u64 = 256;

/// Format byte of a sealed entry.
const SEAL_VERSION: u8 = 1;

/// The 32-byte sealing key, zeroed on drop.
pub struct SealKey(Zeroizing<[u8; 32]>);

impl SealKey {
    /// From 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Reads 64 hex digits (surrounding whitespace ignored) from `path`,
    /// e.g. made by `openssl rand -hex 32`.
    pub fn read(path: &Path) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
        let mut text = Zeroizing::new(String::new());
        file.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read it: {e}"))?;
        let hex = text.trim();
        if text.len() as u64 > MAX_KEY_FILE_BYTES || hex.len() != 64 {
            return Err("it must hold 64 hex digits (make one with `openssl rand -hex 32`)".into());
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let digit = |b: u8| (b as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => bytes[i] = (h * 16 + l) as u8,
                _ => {
                    return Err(
                        "it must hold 64 hex digits (make one with `openssl rand -hex 32`)".into(),
                    );
                }
            }
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// Seals and opens entries (AES-256-GCM, random 96-bit nonce).
pub(super) struct Sealer(LessSafeKey);

impl Sealer {
    pub(super) fn new(key: &SealKey) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        let unbound = UnboundKey::new(&AES_256_GCM, &key.0[..]).expect("a 32-byte AES-256 key");
        Self(LessSafeKey::new(unbound))
    }

    /// `version || nonce || ciphertext || tag`, bound to `aad`.
    pub(super) fn seal(&self, aad: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill(&mut nonce[..]);
        let mut buffer = Zeroizing::new(plain.to_vec());
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut *buffer,
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buffer.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buffer);
        Some(out)
    }

    /// The plaintext, or `None` for anything that is not an entry sealed
    /// under this key for `aad`.
    pub(super) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION || rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = Zeroizing::new(body.to_vec());
        let plain_len = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buffer)
            .ok()?
            .len();
        buffer.truncate(plain_len);
        Some(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_entries_open_only_under_their_key_and_redis_key() {
        let sealer = Sealer::new(&SealKey::from_bytes([7; 32]));
        let other = Sealer::new(&SealKey::from_bytes([8; 32]));
        let sealed = sealer.seal(b"p:token:a", b"ghs_secret").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"ghs_secret"));
        assert_eq!(
            &sealer.open(b"p:token:a", &sealed).unwrap()[..],
            b"ghs_secret"
        );
        assert!(sealer.open(b"p:token:b", &sealed).is_none(), "moved");
        assert!(other.open(b"p:token:a", &sealed).is_none(), "other key");
        for cut in 0..sealed.len() {
            assert!(
                sealer.open(b"p:token:a", &sealed[..cut]).is_none(),
                "cut {cut}"
            );
        }
        for i in 0..sealed.len() {
            let mut edited = sealed.clone();
            edited[i] ^= 1;
            assert!(sealer.open(b"p:token:a", &edited).is_none(), "byte {i}");
        }
    }

    #[test]
    fn key_files_hold_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(SealKey::read(&path).is_ok());
        for bad in [
            "ab".repeat(31),
            "zz".repeat(32),
            "ab".repeat(33),
            String::new(),
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(SealKey::read(&path).unwrap_err().contains("64 hex digits"));
        }
        assert!(SealKey::read(&dir.path().join("missing")).is_err());
    }
}
