//! The `file://` backend: one file per object under a root directory. It
//! owns atomic publication on a local filesystem (write to a temporary name,
//! fsync, rename, fsync the directory, drop the object's pages from the
//! page cache) and must not be used for anything but object storage
//! semantics: no partial objects, no in-place updates.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{Result, Store, StoreError};

pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens (and creates, if absent) a store rooted at `root`.
    pub fn open(root: PathBuf) -> Result<FileStore> {
        fs::create_dir_all(&root).map_err(|e| StoreError::Config {
            store: format!("file://{}", root.display()),
            detail: format!("cannot create the store directory: {e}"),
        })?;
        Ok(FileStore { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        // Keys come from our own code, but a hostile listing or a bug must
        // never turn a key into a path outside the root.
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(StoreError::Config {
                store: self.describe(),
                detail: format!("refusing unsafe object key {key:?}"),
            });
        }
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            store: self.describe(),
            key: key.to_string(),
            source,
        }
    }
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp.") {
            continue;
        }
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if ent.file_type()?.is_dir() {
            walk(&ent.path(), &key, out)?;
        } else {
            // A file deleted between the listing and the stat (a concurrent
            // prune) is simply not listed.
            match ent.metadata() {
                Ok(m) => out.push((key, m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

impl Store for FileStore {
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().expect("key has a parent");
        fs::create_dir_all(dir).map_err(|e| self.io(key, e))?;
        let tmp = dir.join(format!(
            ".tmp.{}.{}",
            path.file_name().unwrap().to_string_lossy(),
            rand::random::<u64>()
        ));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            // The object is clean on disk now and is read again only by a
            // restore or a verify: drop its pages, so that the store's copy
            // of every write does not crowd the application's own pages out
            // of the page cache. Advice only; a failure changes nothing stored.
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            fs::rename(&tmp, &path)?;
            fs::File::open(dir)?.sync_all()
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(self.io(key, e));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        match fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.path(key)?.exists())
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        // List the deepest directory the prefix names, then filter.
        let dir_rel = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let dir = if dir_rel.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_rel)?
        };
        let mut out = Vec::new();
        walk(&dir, dir_rel, &mut out).map_err(|e| self.io(prefix, e))?;
        out.retain(|(k, _)| k.starts_with(prefix));
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        // Not followed by a directory sync: a deletion that a machine crash
        // undoes only brings back an object that the next prune deletes
        // again (every deletion is repeatable).
        match fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn chunk_naming(&self) -> Result<crate::crypt::ChunkNaming> {
        Ok(crate::crypt::ChunkNaming::Plain)
    }
}
