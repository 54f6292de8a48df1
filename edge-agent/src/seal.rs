//! Encryption at rest for buffered payloads: AES-256-GCM (RustCrypto `aes-gcm`).
//!
//! # Design constraints
//! - Keys never live in the configuration file: the file names a key file or
//!   an environment variable, and the key is read from there at start-up.
//! - Every sealed payload is stored with the id of the key that sealed it, so
//!   a rotation (new active key, old key kept as a previous key) never strands
//!   older records; a payload whose key is not configured is a start-up error,
//!   never a silent loss.
//! - A key id is a *key check value* (the first 4 bytes of AES-256 applied to
//!   an all-zero block, as payment HSMs use): it identifies a key without
//!   revealing it, and a wrong key shows up as an unknown id.
//! - Every payload gets a fresh random 96-bit nonce, stored in front of the
//!   ciphertext. Random nonces are safe for up to 2^32 payloads per key
//!   (NIST SP 800-38D), so keys should be rotated well before that
//!   (docs/GUARANTEES.md, "Encryption at rest").
//! - The associated data binds a ciphertext to its record's sequence number and
//!   the buffer's epoch, so a payload cannot be moved to another record
//!   without failing authentication.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, OsRng, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::aes::cipher::BlockEncrypt;
use aes_gcm::{Aes256Gcm, Key, KeyInit, Nonce};
use base64::Engine as _;

const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;

/// Identifies a key; stored beside each sealed payload.
pub type KeyId = i64;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("read encryption key file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {0} (buffer.encryption.key_env) is not set")]
    MissingEnv(String),
    #[error(
        "{0}: an encryption key must be 32 bytes: raw, 64 hex digits or base64 (e.g. `openssl rand -hex 32`)"
    )]
    BadKey(String),
    #[error(
        "the buffer holds records sealed with key id {key_id:08x}, which is not configured (configured: {configured}); set buffer.encryption.previous_key_files to the key that sealed them"
    )]
    UnknownKey { key_id: KeyId, configured: String },
    #[error("a sealed payload failed authentication (damaged, or moved between records)")]
    Authentication,
    #[error("the buffer holds sealed payloads but no encryption key is configured")]
    NotConfigured,
}

/// The keys the agent can seal and open with.
#[derive(Clone, Default)]
pub struct Keyring {
    active: Option<KeyId>,
    keys: HashMap<KeyId, Aes256Gcm>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("Keyring")
            .field("active", &self.active.map(format_key_id))
            .field("keys", &self.describe())
            .finish()
    }
}

impl Keyring {
    /// A keyring that seals nothing and opens nothing: encryption off.
    pub fn disabled() -> Keyring {
        Keyring::default()
    }

    /// Builds a keyring from raw keys: `active` seals new payloads, all of
    /// them open old ones.
    pub fn from_keys(active: Option<[u8; 32]>, previous: &[[u8; 32]]) -> Keyring {
        let mut ring = Keyring::default();
        for key in previous.iter().chain(active.as_ref()) {
            ring.keys
                .insert(key_id(key), Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)));
        }
        ring.active = active.as_ref().map(key_id);
        ring
    }

    /// Loads the keys named by the configuration (encryption is on when a
    /// key file or a key variable is set).
    pub fn load(
        key_file: Option<&Path>,
        key_env: Option<&str>,
        previous_key_files: &[PathBuf],
    ) -> Result<Keyring, SealError> {
        let active = match (key_file, key_env) {
            (Some(path), _) => Some(read_key_file(path)?),
            (None, Some(var)) => {
                let text = std::env::var(var).map_err(|_| SealError::MissingEnv(var.to_owned()))?;
                Some(parse_key(text.as_bytes()).map_err(|()| SealError::BadKey(var.to_owned()))?)
            }
            (None, None) => None,
        };
        let previous = previous_key_files
            .iter()
            .map(|p| read_key_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring::from_keys(active, &previous))
    }

    /// Whether new payloads are sealed.
    pub fn is_enabled(&self) -> bool {
        self.active.is_some()
    }

    pub fn active_key_id(&self) -> Option<KeyId> {
        self.active
    }

    /// Seals a payload with the active key: `nonce || ciphertext || tag`.
    /// `None` when encryption is off.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Option<(KeyId, Vec<u8>)> {
        let id = self.active?;
        let cipher = &self.keys[&id];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some((id, out))
    }

    /// Opens a payload sealed by [`Keyring::seal`] with key `key_id`.
    pub fn open(&self, key_id: KeyId, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let cipher = self.keys.get(&key_id).ok_or_else(|| self.unknown(key_id))?;
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(SealError::Authentication);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().expect("split at the nonce length");
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealError::Authentication)
    }

    /// Refuses to go on if any of `used` (key ids found in a buffer) is not
    /// configured: better a clear start-up error than records nobody can read.
    pub fn check_known(&self, used: &[KeyId]) -> Result<(), SealError> {
        match used.iter().find(|id| !self.keys.contains_key(id)) {
            None => Ok(()),
            Some(_) if self.keys.is_empty() => Err(SealError::NotConfigured),
            Some(&id) => Err(self.unknown(id)),
        }
    }

    fn unknown(&self, key_id: KeyId) -> SealError {
        if self.keys.is_empty() {
            return SealError::NotConfigured;
        }
        SealError::UnknownKey {
            key_id,
            configured: self.describe(),
        }
    }

    fn describe(&self) -> String {
        let mut ids: Vec<String> = self.keys.keys().map(|&id| format_key_id(id)).collect();
        ids.sort();
        ids.join(", ")
    }
}

pub fn format_key_id(id: KeyId) -> String {
    format!("{id:08x}")
}

/// The associated data of a record's payload.
pub fn aad(epoch: &uuid::Uuid, seq: i64) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(epoch.as_bytes());
    out[16..].copy_from_slice(&seq.to_be_bytes());
    out
}

/// The key check value of a key (see the module doc).
pub fn key_id(key: &[u8; 32]) -> KeyId {
    let cipher = Aes256::new(key.into());
    let mut block = [0u8; 16].into();
    cipher.encrypt_block(&mut block);
    KeyId::from(u32::from_be_bytes([block[0], block[1], block[2], block[3]]))
}

/// Reads a key file and makes it durable (file and directory fsynced) before
/// any payload is sealed or opened with it: a key written without an fsync
/// (`openssl rand -hex 32 > key`) and a power cut soon after the agent
/// started would otherwise leave a buffer sealed with a key that is gone.
fn read_key_file(path: &Path) -> Result<[u8; 32], SealError> {
    let read_err = |source| SealError::ReadKey {
        path: path.to_owned(),
        source,
    };
    let bytes = std::fs::read(path).map_err(read_err)?;
    let key = parse_key(&bytes).map_err(|()| SealError::BadKey(path.display().to_string()))?;
    crate::durable::make_durable(path).map_err(read_err)?;
    Ok(key)
}

/// 32 raw bytes, or 64 hex digits, or base64 of 32 bytes (whitespace around
/// the text is ignored).
fn parse_key(bytes: &[u8]) -> Result<[u8; 32], ()> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        // A raw key that happens to be all text is read as text below.
        if !bytes.iter().all(u8::is_ascii_graphic) {
            return Ok(raw);
        }
    }
    let text = std::str::from_utf8(bytes).map_err(|_| ())?.trim();
    let decoded = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| ()))
            .collect::<Result<Vec<u8>, ()>>()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| ())?
    };
    <[u8; 32]>::try_from(decoded.as_slice()).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];

    #[test]
    fn a_sealed_payload_opens_only_with_its_key_and_record() {
        let ring = Keyring::from_keys(Some(K1), &[]);
        let epoch = uuid::Uuid::from_u128(9);
        let (id, sealed) = ring.seal(b"secret payload", &aad(&epoch, 5)).unwrap();
        assert_eq!(id, key_id(&K1));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            ring.open(id, &sealed, &aad(&epoch, 5)).unwrap(),
            b"secret payload"
        );
        // Moved to another record: refused.
        assert!(matches!(
            ring.open(id, &sealed, &aad(&epoch, 6)),
            Err(SealError::Authentication)
        ));
        // One flipped bit: refused.
        let mut damaged = sealed.clone();
        damaged[20] ^= 1;
        assert!(matches!(
            ring.open(id, &damaged, &aad(&epoch, 5)),
            Err(SealError::Authentication)
        ));
    }

    #[test]
    fn nonces_are_fresh_for_every_payload() {
        let ring = Keyring::from_keys(Some(K1), &[]);
        let a = ring.seal(b"x", b"").unwrap().1;
        let b = ring.seal(b"x", b"").unwrap().1;
        assert_ne!(a[..NONCE_BYTES], b[..NONCE_BYTES]);
    }

    #[test]
    fn after_a_rotation_old_payloads_still_open() {
        let old = Keyring::from_keys(Some(K1), &[]);
        let (old_id, sealed) = old.seal(b"before", b"a").unwrap();
        let rotated = Keyring::from_keys(Some(K2), &[K1]);
        assert_eq!(rotated.open(old_id, &sealed, b"a").unwrap(), b"before");
        let (new_id, _) = rotated.seal(b"after", b"a").unwrap();
        assert_ne!(new_id, old_id);
        assert!(rotated.check_known(&[old_id, new_id]).is_ok());
    }

    #[test]
    fn a_wrong_or_missing_key_is_named_not_guessed() {
        let old_id = key_id(&K1);
        let wrong = Keyring::from_keys(Some(K2), &[]);
        let err = wrong.check_known(&[old_id]).unwrap_err().to_string();
        assert!(err.contains(&format_key_id(old_id)), "{err}");
        assert!(err.contains("previous_key_files"), "{err}");
        assert!(matches!(
            Keyring::disabled().check_known(&[old_id]),
            Err(SealError::NotConfigured)
        ));
        assert!(Keyring::disabled().check_known(&[]).is_ok());
        assert!(Keyring::disabled().seal(b"x", b"").is_none());
    }

    #[test]
    fn keys_are_read_as_raw_bytes_hex_or_base64() {
        let hex: String = K2.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_key(format!("{hex}\n").as_bytes()), Ok(K2));
        let b64 = base64::engine::general_purpose::STANDARD.encode(K2);
        assert_eq!(parse_key(b64.as_bytes()), Ok(K2));
        assert_eq!(parse_key(&[0xff; 32]), Ok([0xff; 32]));
        assert!(parse_key(b"too short").is_err());
        assert!(parse_key(&hex.as_bytes()[..62]).is_err());
    }

    #[test]
    fn key_ids_are_the_standard_check_value() {
        // AES-256 of a zero block under the zero key (FIPS-197 test vector).
        assert_eq!(key_id(&[0; 32]), 0xdc95c078);
    }
}
