//! Client-side encryption of a volume's objects: the key-encryption key an
//! operator supplies, the volume's data key and what is derived from it, the
//! sealed-object envelope every object of an encrypted volume is stored in,
//! the wrapped data key, and the keyed chunk names. It owns these two formats
//! and the key schedule; it does no I/O (reading the key file and the store
//! is `store::sealed`) and must not decide which objects are sealed.
//!
//! Key schedule: a volume has one random 32-byte data key. From it, blake3's
//! key derivation gives the XChaCha20-Poly1305 key that seals objects, the
//! key of the nonces and the key of the chunk names, each under its own
//! context string so that no two uses share a key. The operator's
//! key-encryption key (KEK) only wraps the data key, so replacing the KEK
//! (`rewind key rotate`) rewrites one small object and no data.
//!
//! Sealed object (version 1), the store key as associated data so that an
//! object moved to another key fails to open:
//! `"RWSEAL01" | version:u8=1 | nonce:[24] | ciphertext | tag:[16]`.
//! The nonce is a keyed blake3 hash of the object's key and plaintext (a
//! synthetic nonce): a retried put stores the same bytes, and a nonce repeats
//! only for the same key and the same plaintext, which reveals nothing new.
//!
//! Wrapped data key (version 1), stored as `keys/<kek id>.rwk`:
//! `"RWKEY001" | version:u16=1 | nonce:[24] | wrapped data key:[32] | tag:[16]`,
//! sealed with a key derived from the KEK, the object's key as associated
//! data. The KEK id is 8 bytes of a blake3 key derivation from the KEK: it
//! names which wrapping a KEK opens without revealing the KEK.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// The length of every key: the KEK, the data key and the derived keys.
pub const KEY_LEN: usize = 32;
pub const SEALED_MAGIC: &[u8; 8] = b"RWSEAL01";
pub const SEALED_VERSION: u8 = 1;
pub const WRAPPED_MAGIC: &[u8; 8] = b"RWKEY001";
pub const WRAPPED_VERSION: u16 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const SEALED_HEADER: usize = 8 + 1 + NONCE_LEN;
const WRAPPED_LEN: usize = 8 + 2 + NONCE_LEN + KEY_LEN + TAG_LEN;

// Context strings of the key derivations; changing one makes every
// encrypted store unreadable, so they are part of the format.
const CTX_SEAL: &str = "rewind 2026-12 object sealing key";
const CTX_NONCE: &str = "rewind 2026-12 object nonce key";
const CTX_CHUNK: &str = "rewind 2026-12 chunk name key";
const CTX_WRAP: &str = "rewind 2026-12 data key wrapping key";
const CTX_KEK_ID: &str = "rewind 2026-12 key-encryption key id";

/// Why a key or a sealed object was refused. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptError {
    #[error("it holds {0} bytes; an encryption key file must hold 32 random bytes, raw or as 64 hex digits (create one with: head -c 32 /dev/urandom > FILE)")]
    KeyLength(usize),
    #[error("not a sealed Rewind object (bad magic); was it written by a build without encryption or copied in from elsewhere?")]
    NotSealed,
    #[error(
        "sealed object format version {0} is newer than this build reads (1); use a newer rewind"
    )]
    SealedVersion(u8),
    #[error("not a wrapped data key (bad magic or length)")]
    NotWrapped,
    #[error("wrapped data key format version {0} is newer than this build reads (1); use a newer rewind")]
    WrappedVersion(u16),
    #[error("authentication failed: the object was altered, moved from another key, or sealed with another data key")]
    Authentication,
}

/// The operator's key-encryption key.
#[derive(Clone)]
pub struct Kek(Zeroizing<[u8; KEY_LEN]>);

impl Kek {
    /// Reads a key file's content: exactly 32 bytes, or 64 hex digits with
    /// surrounding whitespace (what `openssl rand -hex 32` or a Secret
    /// edited by hand holds).
    pub fn parse(content: &[u8]) -> Result<Kek, CryptError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        if content.len() == KEY_LEN {
            k.copy_from_slice(content);
            return Ok(Kek(k));
        }
        let text = content.trim_ascii();
        if text.len() == 2 * KEY_LEN && text.iter().all(u8::is_ascii_hexdigit) {
            for (i, pair) in text.chunks(2).enumerate() {
                let s =
                    std::str::from_utf8(pair).map_err(|_| CryptError::KeyLength(content.len()))?;
                k[i] =
                    u8::from_str_radix(s, 16).map_err(|_| CryptError::KeyLength(content.len()))?;
            }
            return Ok(Kek(k));
        }
        Err(CryptError::KeyLength(content.len()))
    }

    /// The 16 hex digits that name this KEK's wrapping of a data key.
    pub fn id(&self) -> String {
        let d = blake3::derive_key(CTX_KEK_ID, &self.0[..]);
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Wraps `dk` for storing under `object_key` with the given random nonce.
    pub fn wrap(&self, dk: &DataKey, object_key: &str, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(WRAPPED_MAGIC);
        out.extend_from_slice(&WRAPPED_VERSION.to_le_bytes());
        out.extend_from_slice(nonce);
        let at = out.len();
        out.extend_from_slice(&dk.raw[..]);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &wrapped_aad(object_key),
                &mut out[at..],
            )
            .expect("a 32-byte message always seals");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a wrapping stored under `object_key`.
    pub fn unwrap(&self, data: &[u8], object_key: &str) -> Result<DataKey, CryptError> {
        if data.len() < 10 || &data[..8] != WRAPPED_MAGIC {
            return Err(CryptError::NotWrapped);
        }
        let v = u16::from_le_bytes([data[8], data[9]]);
        if v != WRAPPED_VERSION {
            return Err(CryptError::WrappedVersion(v));
        }
        if data.len() != WRAPPED_LEN {
            return Err(CryptError::NotWrapped);
        }
        let nonce = &data[10..10 + NONCE_LEN];
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        raw.copy_from_slice(&data[10 + NONCE_LEN..10 + NONCE_LEN + KEY_LEN]);
        let tag = &data[10 + NONCE_LEN + KEY_LEN..];
        self.cipher()
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &wrapped_aad(object_key),
                &mut raw[..],
                Tag::from_slice(tag),
            )
            .map_err(|_| CryptError::Authentication)?;
        Ok(DataKey::from_raw(*raw))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        let wk = Zeroizing::new(blake3::derive_key(CTX_WRAP, &self.0[..]));
        XChaCha20Poly1305::new(Key::from_slice(&wk[..]))
    }
}

fn wrapped_aad(object_key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(10 + object_key.len());
    aad.extend_from_slice(WRAPPED_MAGIC);
    aad.extend_from_slice(&WRAPPED_VERSION.to_le_bytes());
    aad.extend_from_slice(object_key.as_bytes());
    aad
}

/// A volume's data key and the keys derived from it.
pub struct DataKey {
    raw: Zeroizing<[u8; KEY_LEN]>,
    cipher: XChaCha20Poly1305,
    nonce_key: Zeroizing<[u8; KEY_LEN]>,
    chunk_key: Zeroizing<[u8; KEY_LEN]>,
}

impl DataKey {
    /// The data key with these 32 bytes (random for a new volume).
    pub fn from_raw(raw: [u8; KEY_LEN]) -> DataKey {
        let seal = Zeroizing::new(blake3::derive_key(CTX_SEAL, &raw));
        DataKey {
            cipher: XChaCha20Poly1305::new(Key::from_slice(&seal[..])),
            nonce_key: Zeroizing::new(blake3::derive_key(CTX_NONCE, &raw)),
            chunk_key: Zeroizing::new(blake3::derive_key(CTX_CHUNK, &raw)),
            raw: Zeroizing::new(raw),
        }
    }

    /// How this volume names its chunks.
    pub fn chunk_naming(&self) -> ChunkNaming {
        ChunkNaming::Keyed(*self.chunk_key)
    }

    /// Seals `plain` for storing under `object_key` (see the module doc).
    pub fn seal(&self, object_key: &str, plain: &[u8]) -> Vec<u8> {
        let mut h = blake3::Hasher::new_keyed(&self.nonce_key);
        h.update(&(object_key.len() as u64).to_le_bytes());
        h.update(object_key.as_bytes());
        h.update(plain);
        let mut nonce = [0u8; NONCE_LEN];
        h.finalize_xof().fill(&mut nonce);
        let mut out = Vec::with_capacity(SEALED_HEADER + plain.len() + TAG_LEN);
        out.extend_from_slice(SEALED_MAGIC);
        out.push(SEALED_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &sealed_aad(object_key),
                &mut out[SEALED_HEADER..],
            )
            .expect("objects are far below the AEAD's message limit");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens an object stored under `object_key`, checking its tag.
    pub fn open(&self, object_key: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptError> {
        if sealed.len() < 9 || &sealed[..8] != SEALED_MAGIC {
            return Err(CryptError::NotSealed);
        }
        if sealed[8] != SEALED_VERSION {
            return Err(CryptError::SealedVersion(sealed[8]));
        }
        if sealed.len() < SEALED_HEADER + TAG_LEN {
            return Err(CryptError::Authentication);
        }
        let nonce = &sealed[9..SEALED_HEADER];
        let (body, tag) = sealed[SEALED_HEADER..].split_at(sealed.len() - SEALED_HEADER - TAG_LEN);
        let mut plain = body.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &sealed_aad(object_key),
                &mut plain,
                Tag::from_slice(tag),
            )
            .map_err(|_| CryptError::Authentication)?;
        Ok(plain)
    }
}

fn sealed_aad(object_key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(9 + object_key.len());
    aad.extend_from_slice(SEALED_MAGIC);
    aad.push(SEALED_VERSION);
    aad.extend_from_slice(object_key.as_bytes());
    aad
}

/// How a volume turns a chunk's content into the hash that names it (in
/// manifests and in the chunk's key). A plaintext volume uses blake3 of the
/// content; an encrypted one blake3 keyed with a key derived from the data
/// key, so equal contents still share a chunk within the volume but a name
/// cannot be matched against a guessed content.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ChunkNaming {
    Plain,
    Keyed([u8; KEY_LEN]),
}

impl std::fmt::Debug for ChunkNaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never goes into a log.
        f.write_str(match self {
            ChunkNaming::Plain => "Plain",
            ChunkNaming::Keyed(_) => "Keyed",
        })
    }
}

impl ChunkNaming {
    pub fn hash(&self, content: &[u8]) -> [u8; 32] {
        match self {
            ChunkNaming::Plain => *blake3::hash(content).as_bytes(),
            ChunkNaming::Keyed(k) => *blake3::keyed_hash(k, content).as_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dk(b: u8) -> DataKey {
        DataKey::from_raw([b; KEY_LEN])
    }

    #[test]
    fn key_files_are_32_raw_bytes_or_64_hex_digits() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let cases: &[(&[u8], Option<usize>)] = &[
            (&[7u8; 32], None),
            (hex.as_bytes(), None),
            (format!("{hex}\n").as_bytes().to_vec().leak(), None),
            (format!("  {hex}\r\n").as_bytes().to_vec().leak(), None),
            (b"", Some(0)),
            (&[7u8; 31], Some(31)),
            (&[7u8; 33], Some(33)),
            (&hex.as_bytes()[..63], Some(63)),
            (
                format!("{}g", &hex[..63]).as_bytes().to_vec().leak(),
                Some(64),
            ),
        ];
        for (content, want) in cases {
            match (Kek::parse(content), want) {
                (Ok(_), None) => {}
                (Err(CryptError::KeyLength(n)), Some(w)) => assert_eq!(n, *w),
                (got, _) => panic!("{content:?}: {:?}", got.map(|k| k.id())),
            }
        }
        let raw: Vec<u8> = (0..32u8)
            .map(|i| {
                [
                    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ][i as usize % 16]
            })
            .collect();
        assert_eq!(
            Kek::parse(&raw).unwrap().id(),
            Kek::parse(hex.as_bytes()).unwrap().id()
        );
    }

    #[test]
    fn a_sealed_object_opens_only_under_its_key_with_its_data_key() {
        let k = dk(1);
        let s = k.seal("seg/a", b"hello");
        assert_eq!(k.open("seg/a", &s).unwrap(), b"hello");
        assert_eq!(s, k.seal("seg/a", b"hello"), "sealing is deterministic");
        assert_ne!(s, k.seal("seg/b", b"hello"), "the key goes into the nonce");
        assert_eq!(k.open("seg/b", &s), Err(CryptError::Authentication));
        assert_eq!(dk(2).open("seg/a", &s), Err(CryptError::Authentication));
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 1;
            assert!(k.open("seg/a", &bad).is_err(), "flipped byte {i}");
        }
        assert_eq!(k.open("seg/a", b"RWSEG..."), Err(CryptError::NotSealed));
        let mut newer = s.clone();
        newer[8] = 2;
        assert_eq!(k.open("seg/a", &newer), Err(CryptError::SealedVersion(2)));
        assert_eq!(k.open("seg/a", &s[..20]), Err(CryptError::Authentication));
        let empty = k.seal("hb/x", b"");
        assert_eq!(k.open("hb/x", &empty).unwrap(), b"");
    }

    #[test]
    fn a_wrapping_opens_only_with_its_kek_under_its_key() {
        let a = Kek::parse(&[1u8; 32]).unwrap();
        let b = Kek::parse(&[2u8; 32]).unwrap();
        assert_ne!(a.id(), b.id());
        let w = a.wrap(&dk(9), "keys/x.rwk", &[5u8; 24]);
        let got = a.unwrap(&w, "keys/x.rwk").unwrap();
        assert_eq!(got.seal("k", b"p"), dk(9).seal("k", b"p"));
        assert!(matches!(
            b.unwrap(&w, "keys/x.rwk"),
            Err(CryptError::Authentication)
        ));
        assert!(matches!(
            a.unwrap(&w, "keys/y.rwk"),
            Err(CryptError::Authentication)
        ));
        assert!(matches!(
            a.unwrap(&w[..40], "keys/x.rwk"),
            Err(CryptError::NotWrapped)
        ));
    }

    #[test]
    fn chunk_names_are_keyed_per_volume() {
        let p = ChunkNaming::Plain;
        assert_eq!(p.hash(b"x"), *blake3::hash(b"x").as_bytes());
        let (a, b) = (dk(1).chunk_naming(), dk(2).chunk_naming());
        assert_eq!(a.hash(b"x"), a.hash(b"x"));
        assert_ne!(a.hash(b"x"), p.hash(b"x"));
        assert_ne!(a.hash(b"x"), b.hash(b"x"));
    }
}
