//! The local catalog: what the sidecar remembers between runs about the
//! last base it took (per file identity, the object with its extents and
//! chunk hashes), and which identities changed after it, so that a
//! restarted sidecar can take an incremental base without reading that
//! base's manifest and the records after it back from the store. It owns
//! the on-disk catalog (a sled database in `<journal dir>/catalog/`), its
//! format and version key, opening, validating and discarding it, and the
//! pure decision of where the first base after a start takes its previous
//! base from ([`resume_decision`]).
//!
//! It is an index, never the truth. A catalog that is missing, damaged,
//! of another version or stale is discarded or ignored, and the next base
//! reloads the newest manifest from the store or reads every file; the log
//! says which and why. What it holds is used only after the caller checked
//! it against the store: the base it describes must be the newest stored
//! base of the lineage, and the chunks that base names count as stored
//! only while the store still holds its manifest (`base::trust_chunks_of`,
//! docs/SEMANTICS.md "What the catalog may trust"). It must not talk to the
//! store: callers pass what they read.
//!
//! Format (version 1): one sled tree with these keys (docs/FORMAT.md):
//! - `version`: `"RWCAT001" version:u16`.
//! - `base`: `key:bytes n_objects:u64 digest:[32]` + blake3 trailer: the
//!   base described, by its manifest key (which names its lineage,
//!   start_seq, completed_ns and kind); `digest` is the blake3 of every
//!   object entry (`key_len:u32 key value_len:u32 value`) in key order, so a
//!   lost, added or garbled entry is found.
//! - `o` + `ino:u64` big-endian: one object of that base, in the manifest's
//!   object layout (`base::put_object`, the kinds of manifest version 2).
//! - `touched`: `base_key:bytes through:u64 n:u64 ino:u64*` + blake3 trailer:
//!   the identities that records after the base's start_seq, up to seq
//!   `through`, changed. Written when a run stops; removed whenever `base`
//!   changes.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BufMut;

use crate::base::{put_object, read_object, BaseKind, BaseMeta, Previous, MANIFEST_VERSION};
use crate::codec::{put_bytes, seal, unseal, DecodeError, Reader};
use crate::record::{Ino, Seq};

/// The catalog's directory inside the journal directory.
pub(crate) const DIR: &str = "catalog";
const MAGIC: &[u8; 8] = b"RWCAT001";
/// The catalog format this build writes and reads; any other is discarded.
pub(crate) const VERSION: u16 = 1;
const VERSION_KEY: &[u8] = b"version";
const BASE_KEY: &[u8] = b"base";
const TOUCHED_KEY: &[u8] = b"touched";
const OBJECT_PREFIX: u8 = b'o';
/// sled's page cache: the catalog is read once per start and written once
/// per base, so a small cache costs nothing that matters.
const CACHE_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CatalogError {
    #[error("catalog {path}: {source}")]
    Sled {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("catalog {path}: sled panicked ({what})")]
    Panicked { path: String, what: String },
}

/// A decoded `base` value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseEntry {
    key: String,
    objects: u64,
    digest: [u8; 32],
}

/// A decoded `touched` value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TouchedEntry {
    base_key: String,
    through: Seq,
    inos: Vec<Ino>,
}

fn encode_version() -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(MAGIC);
    out.put_u16_le(VERSION);
    out
}

fn decode_version(data: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(data);
    if r.take(8)? != MAGIC {
        return Err(r.err("not a Rewind catalog (bad magic)"));
    }
    let v = r.u16()?;
    r.end()?;
    Ok(v)
}

fn encode_base(e: &BaseEntry) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, e.key.as_bytes());
    out.put_u64_le(e.objects);
    out.extend_from_slice(&e.digest);
    seal(&mut out);
    out
}

fn decode_base(data: &[u8]) -> Result<BaseEntry, DecodeError> {
    let mut r = Reader::new(unseal(data)?);
    let key = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| r.err("base key is not UTF-8"))?;
    let objects = r.u64()?;
    let digest = r.hash()?;
    r.end()?;
    Ok(BaseEntry {
        key,
        objects,
        digest,
    })
}

fn encode_touched(e: &TouchedEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(e.inos.len() * 8 + 128);
    put_bytes(&mut out, e.base_key.as_bytes());
    out.put_u64_le(e.through);
    out.put_u64_le(e.inos.len() as u64);
    for ino in &e.inos {
        out.put_u64_le(*ino);
    }
    seal(&mut out);
    out
}

fn decode_touched(data: &[u8]) -> Result<TouchedEntry, DecodeError> {
    let mut r = Reader::new(unseal(data)?);
    let base_key =
        String::from_utf8(r.bytes()?.to_vec()).map_err(|_| r.err("base key is not UTF-8"))?;
    let through = r.u64()?;
    let n = r.u64()?;
    if n > (r.remaining() / 8) as u64 {
        return Err(r.err("identity count larger than the entry"));
    }
    let mut inos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        inos.push(r.u64()?);
    }
    r.end()?;
    Ok(TouchedEntry {
        base_key,
        through,
        inos,
    })
}

fn object_key(ino: Ino) -> [u8; 9] {
    let mut k = [OBJECT_PREFIX; 9];
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

/// Adds one object entry to the digest of the `base` value.
fn digest_entry(h: &mut blake3::Hasher, key: &[u8], value: &[u8]) {
    h.update(&(key.len() as u32).to_le_bytes());
    h.update(key);
    h.update(&(value.len() as u32).to_le_bytes());
    h.update(value);
}

/// A base as the catalog remembers it.
pub(crate) struct Described {
    pub previous: Previous,
    /// The identities changed after the base's start_seq by records up to
    /// the seq given, if the run that last used the catalog recorded them.
    pub touched: Option<(Seq, HashSet<Ino>)>,
}

/// What opening the catalog found.
pub(crate) enum Found {
    /// There was none (first start, or deleted); an empty one was created.
    Missing,
    /// A valid catalog that describes no base yet.
    Empty,
    /// It failed validation or could not be opened; it was discarded and
    /// an empty one created.
    Damaged(String),
    Valid(Described),
}

/// The open catalog.
pub(crate) struct Catalog {
    db: sled::Db,
    dir: PathBuf,
    /// The manifest key of the base the catalog describes on disk.
    describes: Option<String>,
}

fn path_str(dir: &Path) -> String {
    dir.display().to_string()
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// How long an open waits for sled's file lock: sled releases it from a
/// background thread shortly after a `Db` is dropped, so an open right
/// after a close may find it still held. The journal's own lock keeps two
/// daemons from ever sharing a catalog.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens (or creates) the sled database. sled may panic on files it
/// cannot parse; for an index that is damage like any other.
fn open_db(dir: &Path) -> Result<sled::Db, CatalogError> {
    let cfg = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        // Writes are flushed explicitly; no background flusher thread.
        .flush_every_ms(None);
    let until = Instant::now() + LOCK_WAIT;
    loop {
        match std::panic::catch_unwind(AssertUnwindSafe(|| cfg.open())) {
            Ok(Ok(db)) => return Ok(db),
            // sled reports the lock as an error of kind Other whose text
            // says so; nothing else tells it apart.
            Ok(Err(sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock") && Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(Err(source)) => {
                return Err(CatalogError::Sled {
                    path: path_str(dir),
                    source,
                })
            }
            Err(p) => {
                return Err(CatalogError::Panicked {
                    path: path_str(dir),
                    what: panic_text(p),
                })
            }
        }
    }
}

/// Reads and validates everything the catalog holds.
fn load(db: &sled::Db) -> Result<Option<Described>, String> {
    let sled_err = |e: sled::Error| format!("sled: {e}");
    let version = db
        .get(VERSION_KEY)
        .map_err(sled_err)?
        .ok_or("it has no version key")?;
    let v = decode_version(&version).map_err(|e| format!("version key: {e}"))?;
    if v != VERSION {
        return Err(format!(
            "its format version is {v}, this build reads version {VERSION}"
        ));
    }
    let Some(base) = db.get(BASE_KEY).map_err(sled_err)? else {
        if db.scan_prefix([OBJECT_PREFIX]).next().is_some() {
            return Err("it holds objects but no base".into());
        }
        if db.get(TOUCHED_KEY).map_err(sled_err)?.is_some() {
            return Err("it holds changed identities but no base".into());
        }
        return Ok(None);
    };
    let base = decode_base(&base).map_err(|e| format!("base entry: {e}"))?;
    let meta = BaseMeta::from_key(&base.key)
        .ok_or_else(|| format!("base entry names {:?}, not a base manifest key", base.key))?;
    let mut digest = blake3::Hasher::new();
    let mut objects = Vec::new();
    for entry in db.scan_prefix([OBJECT_PREFIX]) {
        let (k, v) = entry.map_err(sled_err)?;
        digest_entry(&mut digest, &k, &v);
        let mut r = Reader::new(&v);
        let o = read_object(&mut r, MANIFEST_VERSION)
            .and_then(|o| r.end().map(|()| o))
            .map_err(|e| format!("object entry {k:?}: {e}"))?;
        if k.as_ref() != object_key(o.ino) {
            return Err(format!("object entry {k:?} holds identity {}", o.ino));
        }
        objects.push(o);
    }
    if objects.len() as u64 != base.objects || digest.finalize().as_bytes() != &base.digest {
        return Err(format!(
            "its {} objects do not match the {} its base entry counts and hashes",
            objects.len(),
            base.objects
        ));
    }
    let touched = match db.get(TOUCHED_KEY).map_err(sled_err)? {
        None => None,
        Some(t) => {
            let t = decode_touched(&t).map_err(|e| format!("touched entry: {e}"))?;
            if t.base_key != base.key {
                return Err(format!(
                    "its changed identities belong to base {}, not to {}",
                    t.base_key, base.key
                ));
            }
            Some((t.through, t.inos.into_iter().collect()))
        }
    };
    Ok(Some(Described {
        previous: Previous::from_objects(meta, objects),
        touched,
    }))
}

/// Creates an empty catalog in `dir` (which must not hold one).
fn create(dir: &Path) -> Result<sled::Db, CatalogError> {
    let db = open_db(dir)?;
    let sled = |source| CatalogError::Sled {
        path: path_str(dir),
        source,
    };
    db.insert(VERSION_KEY, encode_version()).map_err(sled)?;
    db.flush().map_err(sled)?;
    Ok(db)
}

impl Catalog {
    /// Opens the catalog in `journal_dir`, validating everything it holds;
    /// one that is damaged (or of another version) is discarded and an
    /// empty one created. `None` if no catalog can be created at all: the
    /// daemon runs without one (each restart then reads the store).
    pub(crate) fn open(journal_dir: &Path) -> (Option<Catalog>, Found) {
        let dir = journal_dir.join(DIR);
        let existing = if dir.exists() {
            let opened = open_db(&dir).map_err(|e| e.to_string()).and_then(|db| {
                match std::panic::catch_unwind(AssertUnwindSafe(|| load(&db))) {
                    Ok(Ok(d)) => Ok((db, d)),
                    Ok(Err(why)) => Err(why),
                    Err(p) => Err(format!("sled panicked reading it ({})", panic_text(p))),
                }
            });
            match opened {
                Ok((db, d)) => {
                    let describes = d.as_ref().map(|d| d.previous.meta.key());
                    let cat = Catalog { db, dir, describes };
                    return (Some(cat), d.map_or(Found::Empty, Found::Valid));
                }
                Err(why) => {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(
                            "the catalog {} is damaged ({why}) and cannot be removed: {e}; running without a catalog",
                            dir.display()
                        );
                        return (None, Found::Damaged(why));
                    }
                    Some(why)
                }
            }
        } else {
            None
        };
        let found = match existing {
            Some(why) => Found::Damaged(why),
            None => Found::Missing,
        };
        match create(&dir) {
            Ok(db) => (
                Some(Catalog {
                    db,
                    dir,
                    describes: None,
                }),
                found,
            ),
            Err(e) => {
                tracing::warn!("cannot create the catalog: {e}; running without a catalog (a restart reads the previous base back from the store)");
                (None, found)
            }
        }
    }

    fn sled(&self) -> impl Fn(sled::Error) -> CatalogError + '_ {
        |source| CatalogError::Sled {
            path: path_str(&self.dir),
            source,
        }
    }

    /// Makes the catalog describe `prev`, a base of which the caller knows
    /// every chunk was confirmed stored (its manifest may still be on its
    /// way: a restart checks the store's listing before using it). The
    /// changed identities of the base described before are dropped.
    pub(crate) fn record_base(&mut self, prev: &Previous) -> Result<(), CatalogError> {
        let mut entries: BTreeMap<[u8; 9], Vec<u8>> = BTreeMap::new();
        for o in prev.objects() {
            let mut v = Vec::new();
            put_object(&mut v, o);
            entries.insert(object_key(o.ino), v);
        }
        let mut batch = sled::Batch::default();
        for k in self.db.scan_prefix([OBJECT_PREFIX]).keys() {
            let k = k.map_err(self.sled())?;
            if !<[u8; 9]>::try_from(k.as_ref()).is_ok_and(|k| entries.contains_key(&k)) {
                batch.remove(k);
            }
        }
        let mut digest = blake3::Hasher::new();
        for (k, v) in &entries {
            digest_entry(&mut digest, k, v);
        }
        let key = prev.meta.key();
        let head = BaseEntry {
            key: key.clone(),
            objects: entries.len() as u64,
            digest: *digest.finalize().as_bytes(),
        };
        for (k, v) in entries {
            batch.insert(&k[..], v);
        }
        batch.insert(BASE_KEY, encode_base(&head));
        batch.remove(TOUCHED_KEY);
        // Until the batch is applied the old base stays described, whole.
        self.describes = None;
        self.db.apply_batch(batch).map_err(self.sled())?;
        self.db.flush().map_err(self.sled())?;
        self.describes = Some(key);
        Ok(())
    }

    /// Records that records after `base_key`'s start_seq, up to seq
    /// `through`, changed exactly the identities in `touched` (a superset
    /// is fine). Returns false, writing nothing, if the catalog does not
    /// describe that base.
    pub(crate) fn record_touched(
        &mut self,
        base_key: &str,
        through: Seq,
        touched: &HashSet<Ino>,
    ) -> Result<bool, CatalogError> {
        if self.describes.as_deref() != Some(base_key) {
            return Ok(false);
        }
        let mut inos: Vec<Ino> = touched.iter().copied().collect();
        inos.sort_unstable();
        let e = TouchedEntry {
            base_key: base_key.to_string(),
            through,
            inos,
        };
        self.db
            .insert(TOUCHED_KEY, encode_touched(&e))
            .map_err(self.sled())?;
        self.db.flush().map_err(self.sled())?;
        Ok(true)
    }
}

/// Where the first base after a start takes its previous base from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resume {
    /// The catalog's base and the identities it recorded as changed:
    /// nothing is read back from the store.
    Catalog,
    /// The newest stored manifest of the lineage and the records after it,
    /// read from the store before the first periodic base (if that fails,
    /// that base reads every file).
    Store(String),
    /// No previous base: every file is read.
    FullRead(String),
}

/// What the catalog holds, as [`resume_decision`] sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Held<'a> {
    Missing,
    Damaged(&'a str),
    Empty,
    Describes {
        base: &'a BaseMeta,
        /// Up to which seq the catalog knows what changed after the base.
        through: Option<Seq>,
    },
}

/// The pure rule: `start_base` is the base this start must take before
/// anything else (`None` after a clean stop), `newest` the newest stored
/// base of `lineage` whose start_seq is at most `j0`, the last seq that
/// earlier runs wrote. The catalog is used only if it describes exactly
/// that base and knows what every record up to `j0` changed after it.
pub(crate) fn resume_decision(
    start_base: Option<BaseKind>,
    lineage: u64,
    held: Held<'_>,
    newest: Option<&BaseMeta>,
    j0: Seq,
) -> Resume {
    match start_base {
        Some(BaseKind::Initial) => {
            return Resume::FullRead("this start takes the first base of a lineage".into())
        }
        Some(BaseKind::Repair) => {
            return Resume::FullRead(
                "this start takes a repair base after an unclean stop (the source may hold changes no record describes)"
                    .into(),
            )
        }
        Some(BaseKind::Periodic) | None => {}
    }
    let Some(newest) = newest else {
        return Resume::FullRead("the store holds no base of this lineage".into());
    };
    match held {
        Held::Missing => Resume::Store("there is no catalog".into()),
        Held::Damaged(why) => Resume::Store(format!(
            "the catalog was damaged ({why}) and was discarded"
        )),
        Held::Empty => Resume::Store("the catalog describes no base".into()),
        Held::Describes { base, .. } if base.lineage != lineage => Resume::Store(format!(
            "the catalog describes lineage {:016x}, this run continues {lineage:016x}",
            base.lineage
        )),
        Held::Describes { base, .. } if base.key() != newest.key() => Resume::Store(format!(
            "the catalog describes base {}, but the newest stored base is {}",
            base.key(),
            newest.key()
        )),
        Held::Describes { through: None, .. } => Resume::Store(
            "the catalog does not know what changed after its base (the run that used it last did not record it at its stop)"
                .into(),
        ),
        Held::Describes {
            through: Some(t), ..
        } if t < j0 => Resume::Store(format!(
            "the catalog knows the changes up to record {t}, but earlier runs wrote up to {j0}"
        )),
        Held::Describes { .. } => Resume::Catalog,
    }
}

/// What the base thread starts with, from [`resume`].
pub(crate) struct Resumed {
    /// The previous base for the first periodic base to reuse.
    pub previous: Option<Previous>,
    /// Identities changed after `previous`'s start_seq by earlier runs.
    pub pending: HashSet<Ino>,
    /// Reload the previous base from the store before the first periodic base.
    pub reload: bool,
    /// A base whose chunks the first base may count as stored if the
    /// store still holds its manifest (`base::trust_chunks_of`).
    pub seed: Option<Previous>,
}

/// Applies [`resume_decision`] to what opening the catalog found, and says
/// in one log line which source the next base uses and why.
pub(crate) fn resume(
    found: Found,
    start_base: Option<BaseKind>,
    lineage: u64,
    newest: Option<&BaseMeta>,
    j0: Seq,
) -> Resumed {
    let held = match &found {
        Found::Missing => Held::Missing,
        Found::Empty => Held::Empty,
        Found::Damaged(why) => Held::Damaged(why),
        Found::Valid(d) => Held::Describes {
            base: &d.previous.meta,
            through: d.touched.as_ref().map(|(t, _)| *t),
        },
    };
    let decision = resume_decision(start_base, lineage, held, newest, j0);
    let described = match found {
        Found::Valid(d) => Some(d),
        _ => None,
    };
    let seed_note = described.as_ref().map_or(String::new(), |d| {
        format!(
            "; the {} objects' chunks of the catalog's base {} count as stored if the store still holds its manifest",
            d.previous.len(),
            d.previous.meta.key()
        )
    });
    match decision {
        Resume::Catalog => {
            let d = described.expect("the catalog is used only when it describes a base");
            let (_, pending) = d
                .touched
                .expect("the catalog is used only when it knows the changes");
            tracing::info!(
                base = %d.previous.meta.key(),
                changed = pending.len(),
                "catalog: the next base reuses the catalog's base and the identities it recorded as changed; nothing is read back from the store"
            );
            Resumed {
                previous: Some(d.previous),
                pending,
                reload: false,
                seed: None,
            }
        }
        Resume::Store(why) => {
            tracing::info!("catalog not used: {why}; the next incremental base reloads the newest manifest and the records after it from the store{seed_note}");
            Resumed {
                previous: None,
                pending: HashSet::new(),
                reload: true,
                seed: described.map(|d| d.previous),
            }
        }
        Resume::FullRead(why) => {
            tracing::info!("catalog not used: {why}; the next base reads every file{seed_note}");
            Resumed {
                previous: None,
                pending: HashSet::new(),
                reload: false,
                seed: described.map(|d| d.previous),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::base::{Extent, Object};
    use crate::record::Kind;

    fn meta(lineage: u64, start_seq: Seq, completed_ns: i64) -> BaseMeta {
        BaseMeta {
            lineage,
            start_seq,
            completed_ns,
            kind: BaseKind::Periodic,
        }
    }

    fn file(ino: Ino, hash: u8) -> Object {
        Object {
            ino,
            kind: Kind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            size: 10,
            mtime: 5,
            rdev: 0,
            target: Bytes::new(),
            xattrs: vec![(Bytes::from_static(b"user.a"), Bytes::from_static(b"v"))],
            extents: vec![Extent {
                offset: 0,
                len: 10,
                hash: [hash; 32],
            }],
        }
    }

    fn previous(m: &BaseMeta, files: &[(Ino, u8)]) -> Previous {
        let mut objects = vec![Object {
            kind: Kind::Dir,
            extents: Vec::new(),
            ..file(1, 0)
        }];
        objects.extend(files.iter().map(|&(ino, h)| file(ino, h)));
        Previous::from_objects(m.clone(), objects)
    }

    fn sorted(p: &Previous) -> Vec<Object> {
        let mut v: Vec<Object> = p.objects().cloned().collect();
        v.sort_by_key(|o| o.ino);
        v
    }

    fn valid(found: Found) -> Described {
        match found {
            Found::Valid(d) => d,
            Found::Missing => panic!("found no catalog"),
            Found::Empty => panic!("found an empty catalog"),
            Found::Damaged(why) => panic!("found a damaged catalog: {why}"),
        }
    }

    #[test]
    fn entries_round_trip_and_damage_is_found() {
        let b = BaseEntry {
            key: meta(7, 9, 11).key(),
            objects: 3,
            digest: [4; 32],
        };
        assert_eq!(decode_base(&encode_base(&b)).unwrap(), b);
        let t = TouchedEntry {
            base_key: b.key.clone(),
            through: 99,
            inos: vec![2, 5, 1 << 40],
        };
        assert_eq!(decode_touched(&encode_touched(&t)).unwrap(), t);
        assert_eq!(decode_version(&encode_version()).unwrap(), VERSION);
        for enc in [encode_base(&b), encode_touched(&t)] {
            for i in [0, enc.len() / 2, enc.len() - 1] {
                let mut bad = enc.clone();
                bad[i] ^= 0x40;
                assert!(
                    decode_base(&bad).is_err() && decode_touched(&bad).is_err(),
                    "flip at {i}"
                );
            }
            assert!(decode_base(&enc[..enc.len() - 1]).is_err());
        }
        assert!(decode_version(b"RWCAT00X\x01\x00").is_err());
    }

    #[test]
    fn a_catalog_survives_a_reopen_and_follows_each_base() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, found) = Catalog::open(dir.path());
        assert!(matches!(found, Found::Missing));
        drop(cat);
        let (cat, found) = Catalog::open(dir.path());
        assert!(matches!(found, Found::Empty));
        let mut cat = cat.unwrap();
        let m1 = meta(7, 10, 100);
        let p1 = previous(&m1, &[(2, 1), (3, 2), (4, 3)]);
        cat.record_base(&p1).unwrap();
        // Changes recorded for another base are refused.
        assert!(!cat
            .record_touched(&meta(7, 5, 50).key(), 20, &HashSet::from([2]))
            .unwrap());
        assert!(cat
            .record_touched(&m1.key(), 20, &HashSet::from([3, 9]))
            .unwrap());
        drop(cat);
        let (cat, found) = Catalog::open(dir.path());
        let d = valid(found);
        assert_eq!(d.previous.meta, m1);
        assert_eq!(sorted(&d.previous), sorted(&p1));
        assert_eq!(d.touched, Some((20, HashSet::from([3, 9]))));
        // The next base replaces the objects (one gone, one new, one
        // changed) and forgets the changes recorded for the old one.
        let mut cat = cat.unwrap();
        let m2 = meta(7, 30, 300);
        let p2 = previous(&m2, &[(2, 1), (4, 8), (5, 9)]);
        cat.record_base(&p2).unwrap();
        drop(cat);
        let d = valid(Catalog::open(dir.path()).1);
        assert_eq!(d.previous.meta, m2);
        assert_eq!(sorted(&d.previous), sorted(&p2));
        assert_eq!(d.touched, None);
    }

    /// Writes straight into the sled tree behind the catalog's back, the
    /// way damage or a foreign writer would.
    fn tamper(dir: &Path, f: impl FnOnce(&sled::Db)) {
        let db = open_db(&dir.join(DIR)).unwrap();
        f(&db);
        db.flush().unwrap();
    }

    #[test]
    fn a_damaged_catalog_is_discarded() {
        let m = meta(7, 10, 100);
        let p = previous(&m, &[(2, 1), (3, 2)]);
        type Damage = fn(&sled::Db);
        let cases: &[(&str, Damage, &str)] = &[
            (
                "lost object",
                |db| {
                    db.remove(object_key(3)).unwrap();
                },
                "do not match",
            ),
            (
                "extra object",
                |db| {
                    let mut v = Vec::new();
                    put_object(&mut v, &file(8, 1));
                    db.insert(object_key(8), v).unwrap();
                },
                "do not match",
            ),
            (
                "garbled object",
                |db| {
                    let mut v = db.get(object_key(2)).unwrap().unwrap().to_vec();
                    let at = v.len() - 3;
                    v[at] ^= 1;
                    db.insert(object_key(2), v).unwrap();
                },
                "do not match",
            ),
            (
                "undecodable object",
                |db| {
                    db.insert(object_key(2), &b"xx"[..]).unwrap();
                },
                "object entry",
            ),
            (
                "object under another key",
                |db| {
                    let v = db.get(object_key(2)).unwrap().unwrap();
                    db.remove(object_key(2)).unwrap();
                    db.insert(object_key(6), v).unwrap();
                },
                "holds identity",
            ),
            (
                "garbled base entry",
                |db| {
                    let mut v = db.get(BASE_KEY).unwrap().unwrap().to_vec();
                    v[3] ^= 1;
                    db.insert(BASE_KEY, v).unwrap();
                },
                "base entry",
            ),
            (
                "no base entry",
                |db| {
                    db.remove(BASE_KEY).unwrap();
                },
                "no base",
            ),
            (
                "no version",
                |db| {
                    db.remove(VERSION_KEY).unwrap();
                },
                "no version key",
            ),
            (
                "another version",
                |db| {
                    let mut v = encode_version();
                    v[8] = 9;
                    db.insert(VERSION_KEY, v).unwrap();
                },
                "format version is 9",
            ),
            (
                "changes of another base",
                |db| {
                    let t = TouchedEntry {
                        base_key: meta(7, 1, 1).key(),
                        through: 5,
                        inos: vec![],
                    };
                    db.insert(TOUCHED_KEY, encode_touched(&t)).unwrap();
                },
                "belong to base",
            ),
        ];
        for (what, damage, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut cat = Catalog::open(dir.path()).0.unwrap();
            cat.record_base(&p).unwrap();
            drop(cat);
            tamper(dir.path(), damage);
            let (cat, found) = Catalog::open(dir.path());
            match found {
                Found::Damaged(why) => assert!(why.contains(want), "{what}: {why}"),
                _ => panic!("{what}: not found damaged"),
            }
            // Discarded and created again, empty and usable.
            let mut cat = cat.unwrap_or_else(|| panic!("{what}: no catalog after the discard"));
            cat.record_base(&p).unwrap();
            drop(cat);
            assert_eq!(
                valid(Catalog::open(dir.path()).1).previous.meta,
                m,
                "{what}"
            );
        }
    }

    /// Garbage written over sled's own files: whatever sled makes of it
    /// (an error, a panic, or the prefix of its log before the damage), the
    /// catalog is discarded, or holds a state it really was in, never a
    /// wrong one; and a new one works.
    #[test]
    fn garbage_in_the_files_is_never_taken_for_a_catalog() {
        let m = meta(7, 10, 100);
        let files: Vec<(Ino, u8)> = (2..400).map(|i| (i, (i % 251) as u8)).collect();
        let p = previous(&m, &files);
        for seed in 0..12u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut cat = Catalog::open(dir.path()).0.unwrap();
            cat.record_base(&p).unwrap();
            drop(cat);
            let mut paths = Vec::new();
            let mut stack = vec![dir.path().join(DIR)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let e = e.unwrap().path();
                    if e.is_dir() {
                        stack.push(e);
                    } else {
                        paths.push(e);
                    }
                }
            }
            paths.sort();
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for path in &paths {
                let mut data = std::fs::read(path).unwrap();
                // From seed 3 on, sled's small configuration file is left
                // alone, so that sled reads the damaged data itself.
                if data.is_empty() || (seed >= 3 && path.ends_with("conf")) {
                    continue;
                }
                // Seed 0 overwrites whole files, the others a few runs of bytes.
                if seed == 0 {
                    rng.fill(&mut data[..]);
                } else {
                    for _ in 0..4 {
                        let at = rng.gen_range(0..data.len());
                        let end = (at + rng.gen_range(1..64)).min(data.len());
                        rng.fill(&mut data[at..end]);
                    }
                }
                std::fs::write(path, data).unwrap();
            }
            let (cat, found) = Catalog::open(dir.path());
            match found {
                Found::Valid(d) => {
                    assert_eq!(d.previous.meta, m, "seed {seed}");
                    assert_eq!(sorted(&d.previous), sorted(&p), "seed {seed}");
                }
                // sled keeps the prefix of its log before the damage: a
                // state the catalog really was in, here the empty one.
                Found::Empty => {
                    assert!(seed >= 3, "seed {seed}: damage taken for an empty catalog")
                }
                Found::Damaged(_) => {}
                Found::Missing => panic!("seed {seed}: the damaged catalog was not found"),
            }
            let mut cat = cat.unwrap();
            cat.record_base(&p).unwrap();
            drop(cat);
            assert_eq!(
                valid(Catalog::open(dir.path()).1).previous.meta,
                m,
                "seed {seed}"
            );
        }
    }

    #[test]
    fn where_the_first_base_after_a_start_takes_its_previous_base_from() {
        let l = 7;
        let newest = meta(l, 50, 500);
        let older = meta(l, 20, 200);
        let other = meta(8, 50, 500);
        use Held::*;
        enum Want {
            Catalog,
            Store(&'static str),
            Full(&'static str),
        }
        #[rustfmt::skip]
        let table: &[(&str, Option<BaseKind>, Held, Option<&BaseMeta>, Seq, Want)] = &[
            ("matches and knows every change",      None, Describes { base: &newest, through: Some(90) }, Some(&newest), 90, Want::Catalog),
            ("knows more than the journal holds",   None, Describes { base: &newest, through: Some(95) }, Some(&newest), 90, Want::Catalog),
            ("knows changes only up to an earlier run", None, Describes { base: &newest, through: Some(80) }, Some(&newest), 90, Want::Store("up to record 80")),
            ("never recorded the changes",          None, Describes { base: &newest, through: None }, Some(&newest), 90, Want::Store("does not know what changed")),
            ("stale: an older base",                None, Describes { base: &older, through: Some(90) }, Some(&newest), 90, Want::Store("newest stored base is")),
            ("ahead: a base the store lacks",       None, Describes { base: &newest, through: Some(90) }, Some(&older), 90, Want::Store("newest stored base is")),
            ("another lineage",                     None, Describes { base: &other, through: Some(90) }, Some(&newest), 90, Want::Store("describes lineage")),
            ("deleted",                             None, Missing, Some(&newest), 90, Want::Store("no catalog")),
            ("damaged",                             None, Damaged("bad digest"), Some(&newest), 90, Want::Store("damaged (bad digest)")),
            ("empty",                               None, Empty, Some(&newest), 90, Want::Store("describes no base")),
            ("the store holds no base",             None, Describes { base: &newest, through: Some(90) }, None, 90, Want::Full("no base of this lineage")),
            ("repair base after an unclean stop",   Some(BaseKind::Repair), Describes { base: &newest, through: Some(90) }, Some(&newest), 90, Want::Full("repair base")),
            ("first base of a new lineage",         Some(BaseKind::Initial), Describes { base: &other, through: Some(90) }, Some(&newest), 90, Want::Full("first base")),
        ];
        for (what, start, held, newest, j0, want) in table {
            let got = resume_decision(*start, l, *held, *newest, *j0);
            match (want, &got) {
                (Want::Catalog, Resume::Catalog) => {}
                (Want::Store(s), Resume::Store(why)) if why.contains(s) => {}
                (Want::Full(s), Resume::FullRead(why)) if why.contains(s) => {}
                _ => panic!("{what}: got {got:?}"),
            }
        }
    }

    #[test]
    fn resume_hands_over_the_catalog_or_only_its_chunks() {
        let m = meta(7, 50, 500);
        let d = || Described {
            previous: previous(&m, &[(2, 1)]),
            touched: Some((90, HashSet::from([2]))),
        };
        let r = resume(Found::Valid(d()), None, 7, Some(&m), 90);
        assert!(!r.reload && r.seed.is_none());
        assert_eq!(r.previous.unwrap().meta, m);
        assert_eq!(r.pending, HashSet::from([2]));
        // A repair base reads every file but may still trust the chunks.
        let r = resume(Found::Valid(d()), Some(BaseKind::Repair), 7, Some(&m), 90);
        assert!(!r.reload && r.previous.is_none() && r.pending.is_empty());
        assert_eq!(r.seed.unwrap().meta, m);
        let r = resume(Found::Missing, None, 7, Some(&m), 90);
        assert!(r.reload && r.previous.is_none() && r.seed.is_none());
    }
}
