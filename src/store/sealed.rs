//! A volume's store as the rest of Rewind sees it: plaintext objects for a
//! volume written without encryption, sealed ones (`crypt`) for a volume
//! written with `--encryption-key-file`. It owns the decision which a volume
//! is, made once from the volume's `keys/` objects before any other object is
//! read or written, so that a key given for a plaintext volume, a missing key
//! for an encrypted one and a wrong key are refused before anything is
//! uploaded; and it creates a new volume's data key. It reads the key file
//! and must not interpret object contents beyond the envelope.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::RngCore;

use super::{Result, Store, StoreError, Undeleted};
use crate::crypt::{ChunkNaming, CryptError, DataKey, Kek, KEY_LEN};

/// The key prefix that holds a volume's wrapped data keys. No volume name
/// may end in it (`timeline::check_volume_name`).
pub const KEYS_DIR: &str = "keys";

/// Key kinds whose presence says a volume already holds data: every volume
/// this build writes has a lineage marker from its first start, and older
/// ones have bases and segments.
const DATA_KINDS: [&str; 3] = ["lineage/", "base/", "seg/"];

/// Why a volume's encryption setup was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the encryption key file {}: {source} (mount the Secret that holds it, or leave out --encryption-key-file for a plaintext volume)", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encryption key file {}: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: CryptError,
    },
    #[error("wrong encryption key: this key (id {given}) does not open the volume, whose data key is wrapped only for key id(s) {wrapped}; use the key the volume was written with, or the new one after `rewind key rotate`")]
    WrongKey { given: String, wrapped: String },
    #[error("the wrapped data key {key} cannot be opened with this key (id {given}): {source}; the object was altered or replaced")]
    BadWrapping {
        key: String,
        given: String,
        #[source]
        source: CryptError,
    },
    #[error("an encryption key was given but the volume is not encrypted (it has no {KEYS_DIR}/ objects and already holds plaintext data); leave out --encryption-key-file to use it, or encrypt under a new --volume name")]
    PlaintextVolume,
    #[error("an encryption key was given but the volume holds nothing yet (no {KEYS_DIR}/ objects); only `rewind run` creates an encrypted volume's data key")]
    EmptyVolume,
    #[error("the volume is encrypted (its data key is wrapped in {KEYS_DIR}/ for key id(s) {wrapped}) and no key was given; pass --encryption-key-file with the volume's key")]
    KeyRequired { wrapped: String },
    #[error(
        "the old and the new key are the same key (id {0}); `rewind key rotate` needs a new key"
    )]
    SameKey(String),
}

/// Reads a key-encryption key from a file.
pub fn read_key_file(path: &Path) -> std::result::Result<Kek, KeyError> {
    let content =
        zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?);
    Kek::parse(&content).map_err(|source| KeyError::Malformed {
        path: path.to_path_buf(),
        source,
    })
}

/// How a volume is opened.
pub enum Encryption {
    /// No key: the volume must be plaintext.
    Off,
    /// The volume must be encrypted with a data key this KEK unwraps;
    /// `create` lets an empty volume get a new data key (only `rewind run`).
    Key { kek: Kek, create: bool },
}

enum Resolved {
    Plain,
    Sealed(DataKey),
}

/// The volume's store (over a `Prefixed` one): see the module doc. The
/// decision is made at the first call (or `check`) and kept; a transient
/// store error leaves it unmade, so the next call tries again and nothing
/// is read or written before it is made.
pub struct Volume {
    inner: Arc<dyn Store>,
    mode: Encryption,
    resolved: Mutex<Option<Arc<Resolved>>>,
}

fn wrapping_key(kek_id: &str) -> String {
    format!("{KEYS_DIR}/{kek_id}.rwk")
}

/// The KEK ids of the wrappings a `keys/` listing holds.
fn wrapping_ids(keys: &[String]) -> Vec<String> {
    keys.iter()
        .filter_map(|k| {
            k.strip_prefix(&format!("{KEYS_DIR}/"))?
                .strip_suffix(".rwk")
        })
        .map(str::to_string)
        .collect()
}

impl Volume {
    pub fn new(inner: Arc<dyn Store>, mode: Encryption) -> Volume {
        Volume {
            inner,
            mode,
            resolved: Mutex::new(None),
        }
    }

    /// Makes the decision now (at start), so that a refusal is reported
    /// before anything else happens.
    pub fn check(&self) -> Result<()> {
        self.resolved().map(|_| ())
    }

    /// Whether the volume is encrypted (after a successful `check`).
    pub fn encrypted(&self) -> Result<bool> {
        Ok(matches!(*self.resolved()?, Resolved::Sealed(_)))
    }

    fn refuse(&self, source: KeyError) -> StoreError {
        StoreError::Key {
            store: self.inner.describe(),
            source,
        }
    }

    fn resolved(&self) -> Result<Arc<Resolved>> {
        let mut slot = self.resolved.lock();
        if let Some(r) = &*slot {
            return Ok(r.clone());
        }
        let r = Arc::new(self.resolve()?);
        *slot = Some(r.clone());
        Ok(r)
    }

    fn resolve(&self) -> Result<Resolved> {
        let keys = self.inner.list(&format!("{KEYS_DIR}/"))?;
        let ids = wrapping_ids(&keys);
        match &self.mode {
            Encryption::Off if ids.is_empty() => Ok(Resolved::Plain),
            Encryption::Off => Err(self.refuse(KeyError::KeyRequired {
                wrapped: ids.join(", "),
            })),
            Encryption::Key { kek, create } if ids.is_empty() => {
                for kind in DATA_KINDS {
                    if !self.inner.list(kind)?.is_empty() {
                        return Err(self.refuse(KeyError::PlaintextVolume));
                    }
                }
                if !create {
                    return Err(self.refuse(KeyError::EmptyVolume));
                }
                let mut raw = zeroize::Zeroizing::new([0u8; KEY_LEN]);
                rand::rngs::OsRng.fill_bytes(&mut raw[..]);
                let dk = DataKey::from_raw(*raw);
                self.put_wrapping(kek, &dk)?;
                tracing::info!(key_id = %kek.id(), "created the volume's data key (encrypted volume)");
                Ok(Resolved::Sealed(dk))
            }
            Encryption::Key { kek, .. } => Ok(Resolved::Sealed(self.unwrap_with(kek, &ids)?)),
        }
    }

    fn unwrap_with(&self, kek: &Kek, ids: &[String]) -> Result<DataKey> {
        let given = kek.id();
        if !ids.contains(&given) {
            return Err(self.refuse(KeyError::WrongKey {
                given,
                wrapped: ids.join(", "),
            }));
        }
        let key = wrapping_key(&given);
        let data = self.inner.get(&key)?;
        kek.unwrap(&data, &key)
            .map_err(|source| self.refuse(KeyError::BadWrapping { key, given, source }))
    }

    fn put_wrapping(&self, kek: &Kek, dk: &DataKey) -> Result<()> {
        let key = wrapping_key(&kek.id());
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.inner
            .put(&key, Bytes::from(kek.wrap(dk, &key, &nonce)))?;
        // Read back: a wrapping that does not open would lose the volume.
        kek.unwrap(&self.inner.get(&key)?, &key)
            .map(|_| ())
            .map_err(|source| {
                self.refuse(KeyError::BadWrapping {
                    key,
                    given: kek.id(),
                    source,
                })
            })
    }

    /// Re-wraps the data key for `new` and removes `old`'s wrapping; no
    /// other object changes. The volume must have been opened with `old`.
    pub fn rotate(&self, old: &Kek, new: &Kek) -> Result<()> {
        if old.id() == new.id() {
            return Err(self.refuse(KeyError::SameKey(old.id())));
        }
        let r = self.resolved()?;
        let Resolved::Sealed(dk) = &*r else {
            unreachable!("a volume opened with a key is sealed")
        };
        self.put_wrapping(new, dk)?;
        // The old wrapping goes last, once the new one is known to open:
        // an interrupted rotation leaves both keys working.
        self.inner.delete(&wrapping_key(&old.id()))
    }
}

impl Store for Volume {
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        match &*self.resolved()? {
            Resolved::Plain => self.inner.put(key, data),
            Resolved::Sealed(dk) => self.inner.put(key, Bytes::from(dk.seal(key, &data))),
        }
    }
    fn get(&self, key: &str) -> Result<Bytes> {
        let r = self.resolved()?;
        let data = self.inner.get(key)?;
        match &*r {
            Resolved::Plain => Ok(data),
            Resolved::Sealed(dk) => {
                dk.open(key, &data)
                    .map(Bytes::from)
                    .map_err(|e| StoreError::Sealed {
                        store: self.inner.describe(),
                        key: key.to_string(),
                        source: e,
                    })
            }
        }
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.resolved()?;
        self.inner.exists(key)
    }
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.resolved()?;
        self.inner.list_sized(prefix)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.resolved()?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.resolved()?;
        self.inner.delete(key)
    }
    fn delete_many(&self, keys: &[String]) -> Result<Vec<Undeleted>> {
        self.resolved()?;
        self.inner.delete_many(keys)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn abort_incomplete_uploads(&self, prefix: &str) -> Result<usize> {
        self.inner.abort_incomplete_uploads(prefix)
    }
    fn chunk_naming(&self) -> Result<ChunkNaming> {
        Ok(match &*self.resolved()? {
            Resolved::Plain => ChunkNaming::Plain,
            Resolved::Sealed(dk) => dk.chunk_naming(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;

    fn kek(b: u8) -> Kek {
        Kek::parse(&[b; 32]).unwrap()
    }

    fn open(root: &Path, mode: Encryption) -> Volume {
        Volume::new(Arc::new(FileStore::open(root.to_path_buf()).unwrap()), mode)
    }

    fn refusal(v: &Volume) -> KeyError {
        match v.check() {
            Err(StoreError::Key { source, .. }) => source,
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[test]
    fn each_mismatch_of_key_and_volume_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        open(&plain, Encryption::Off)
            .put("lineage/x", Bytes::new())
            .unwrap();
        let enc = dir.path().join("enc");
        let v = open(
            &enc,
            Encryption::Key {
                kek: kek(1),
                create: true,
            },
        );
        v.put("seg/a", Bytes::from_static(b"secret")).unwrap();
        assert!(!std::fs::read(enc.join("seg/a"))
            .unwrap()
            .windows(6)
            .any(|w| w == b"secret"));
        let empty = dir.path().join("empty");

        let cases: Vec<(&Path, Encryption, fn(&KeyError) -> bool)> = vec![
            (
                &plain,
                Encryption::Key {
                    kek: kek(1),
                    create: true,
                },
                |e| matches!(e, KeyError::PlaintextVolume),
            ),
            (&enc, Encryption::Off, |e| {
                matches!(e, KeyError::KeyRequired { .. })
            }),
            (
                &enc,
                Encryption::Key {
                    kek: kek(2),
                    create: true,
                },
                |e| matches!(e, KeyError::WrongKey { .. }),
            ),
            (
                &empty,
                Encryption::Key {
                    kek: kek(1),
                    create: false,
                },
                |e| matches!(e, KeyError::EmptyVolume),
            ),
        ];
        for (root, mode, want) in cases {
            let before = FileStore::open(root.to_path_buf())
                .unwrap()
                .list("")
                .unwrap();
            let v = open(root, mode);
            let e = refusal(&v);
            assert!(want(&e), "{}: {e}", root.display());
            assert!(v.put("seg/b", Bytes::new()).is_err());
            assert_eq!(
                FileStore::open(root.to_path_buf())
                    .unwrap()
                    .list("")
                    .unwrap(),
                before
            );
        }
        let v = open(
            &enc,
            Encryption::Key {
                kek: kek(1),
                create: false,
            },
        );
        assert_eq!(&v.get("seg/a").unwrap()[..], b"secret");
        assert!(v.encrypted().unwrap());
        assert!(!open(&plain, Encryption::Off).encrypted().unwrap());
    }

    #[test]
    fn no_volume_name_ends_in_the_keys_kind() {
        use crate::timeline::check_volume_name;
        for (name, ok) in [
            ("shop/keys", false),
            ("keys", false),
            ("shop/keyring", true),
            ("keys/db", true),
        ] {
            assert_eq!(check_volume_name(name).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn rotation_rewraps_and_the_old_key_stops_working() {
        let dir = tempfile::tempdir().unwrap();
        let v = open(
            dir.path(),
            Encryption::Key {
                kek: kek(1),
                create: true,
            },
        );
        v.put("seg/a", Bytes::from_static(b"data")).unwrap();
        let sealed_before = std::fs::read(dir.path().join("seg/a")).unwrap();
        assert!(matches!(
            v.rotate(&kek(1), &kek(1)),
            Err(StoreError::Key {
                source: KeyError::SameKey(_),
                ..
            })
        ));
        v.rotate(&kek(1), &kek(2)).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("seg/a")).unwrap(),
            sealed_before,
            "no data rewritten"
        );
        let new = open(
            dir.path(),
            Encryption::Key {
                kek: kek(2),
                create: false,
            },
        );
        assert_eq!(&new.get("seg/a").unwrap()[..], b"data");
        let old = open(
            dir.path(),
            Encryption::Key {
                kek: kek(1),
                create: false,
            },
        );
        assert!(matches!(refusal(&old), KeyError::WrongKey { .. }));
    }

    #[test]
    fn a_flipped_byte_or_swapped_objects_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let v = open(
            dir.path(),
            Encryption::Key {
                kek: kek(1),
                create: true,
            },
        );
        v.put("seg/a", Bytes::from_static(b"aaaa")).unwrap();
        v.put("seg/b", Bytes::from_static(b"bbbb")).unwrap();
        let (pa, pb) = (dir.path().join("seg/a"), dir.path().join("seg/b"));
        let (a, b) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
        std::fs::write(&pa, &b).unwrap();
        std::fs::write(&pb, &a).unwrap();
        assert!(matches!(v.get("seg/a"), Err(StoreError::Sealed { .. })));
        assert!(matches!(v.get("seg/b"), Err(StoreError::Sealed { .. })));
        let mut flipped = a.clone();
        flipped[40] ^= 0x80;
        std::fs::write(&pa, &flipped).unwrap();
        assert!(matches!(v.get("seg/a"), Err(StoreError::Sealed { .. })));
    }
}
