//! The in-memory tree: a replay target that holds what a restore would put
//! on disk, except file contents (names, kinds, modes, owners, sizes,
//! mtimes, symlink targets, device numbers, hard links, xattrs, and per
//! file the bytes that records wrote). `diff` compares two of them; a
//! read-only view of an instant can serve one. It must not do I/O.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::{Attrs, Effects, Namespace, ReplayError};
use crate::clock::Nanos;
use crate::record::{Ino, Kind};

/// What the memory tree keeps of one object besides the model's names,
/// size and mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Object {
    pub(crate) kind: Kind,
    pub(crate) attrs: Attrs,
    pub(crate) rdev: u64,
    pub(crate) target: Bytes,
    pub(crate) xattrs: BTreeMap<Bytes, Bytes>,
    /// Bytes that records wrote to it (the base's data does not count).
    pub(crate) written: u64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Memory {
    pub(crate) objects: HashMap<Ino, Object>,
}

/// One object of a memory tree at its paths, as `Memory::listing` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) ino: Ino,
    /// The directory that holds this name.
    pub(crate) parent: Ino,
    pub(crate) kind: Kind,
    pub(crate) attrs: Attrs,
    pub(crate) size: u64,
    pub(crate) mtime: Option<Nanos>,
    pub(crate) target: Bytes,
    pub(crate) rdev: u64,
    pub(crate) xattrs: BTreeMap<Bytes, Bytes>,
    pub(crate) written: u64,
}

impl Memory {
    /// Every path in the tree (relative to the root, joined with '/') with
    /// what it names. Names under directories that have no name are not in
    /// the tree and are left out.
    pub(crate) fn listing(&self, ns: &Namespace) -> BTreeMap<String, Entry> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(ns.root(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for (name, ino) in ns.children(dir) {
                let path = format!("{prefix}{}", String::from_utf8_lossy(&name));
                let (Some(o), Some(n)) = (self.objects.get(&ino), ns.node(ino)) else {
                    continue;
                };
                if o.kind == Kind::Dir {
                    stack.push((ino, format!("{path}/")));
                }
                out.insert(
                    path,
                    Entry {
                        ino,
                        parent: dir,
                        kind: o.kind,
                        attrs: o.attrs,
                        size: n.size,
                        mtime: n.mtime,
                        target: o.target.clone(),
                        rdev: o.rdev,
                        xattrs: o.xattrs.clone(),
                        written: o.written,
                    },
                );
            }
        }
        out
    }
}

impl Effects for Memory {
    type Error = ReplayError;

    fn make(
        &mut self,
        _: &Namespace,
        ino: Ino,
        kind: Kind,
        attrs: Attrs,
        rdev: u64,
        target: &[u8],
    ) -> Result<(), ReplayError> {
        let rdev = if matches!(kind, Kind::CharDev | Kind::BlockDev) {
            rdev
        } else {
            0
        };
        self.objects.insert(
            ino,
            Object {
                kind,
                attrs: Attrs {
                    mode: attrs.mode & 0o7777,
                    ..attrs
                },
                rdev,
                target: Bytes::copy_from_slice(target),
                xattrs: BTreeMap::new(),
                written: 0,
            },
        );
        Ok(())
    }

    fn link(&mut self, _: &Namespace, _: Ino, _: &[u8], _: Ino) -> Result<(), ReplayError> {
        Ok(())
    }

    fn unlink(&mut self, _: &Namespace, _: Ino, _: &[u8], _: Ino) -> Result<(), ReplayError> {
        Ok(())
    }

    fn rename(
        &mut self,
        _: &Namespace,
        _: (Ino, &[u8]),
        _: (Ino, &[u8]),
        _: Ino,
        _: Option<Ino>,
    ) -> Result<(), ReplayError> {
        Ok(())
    }

    fn exchange(
        &mut self,
        _: &Namespace,
        _: (Ino, &[u8]),
        _: (Ino, &[u8]),
    ) -> Result<(), ReplayError> {
        Ok(())
    }

    fn renumber(&mut self, _: &Namespace, old: Ino, new: Ino) -> Result<(), ReplayError> {
        if let Some(o) = self.objects.remove(&old) {
            self.objects.insert(new, o);
        }
        Ok(())
    }

    fn discard(&mut self, _: &Namespace, ino: Ino) -> Result<(), ReplayError> {
        self.objects.remove(&ino);
        Ok(())
    }

    fn write(&mut self, _: &Namespace, ino: Ino, _: u64, data: &[u8]) -> Result<(), ReplayError> {
        if let Some(o) = self.objects.get_mut(&ino) {
            o.written += data.len() as u64;
        }
        Ok(())
    }

    fn set_size(&mut self, _: &Namespace, _: Ino, _: u64) -> Result<(), ReplayError> {
        Ok(())
    }

    fn fallocate(
        &mut self,
        _: &Namespace,
        _: Ino,
        _: u32,
        _: u64,
        _: u64,
    ) -> Result<(), ReplayError> {
        Ok(())
    }

    fn set_attrs(&mut self, ns: &Namespace, ino: Ino, attrs: Attrs) -> Result<(), ReplayError> {
        if ino == ns.root() && !self.objects.contains_key(&ino) {
            self.make(ns, ino, Kind::Dir, attrs, 0, b"")?;
        }
        if let Some(o) = self.objects.get_mut(&ino) {
            // A symlink's mode is not its own to change (lchmod does not
            // exist on Linux); a restore only chowns it.
            if o.kind != Kind::Symlink {
                o.attrs.mode = attrs.mode & 0o7777;
            }
            o.attrs.uid = attrs.uid;
            o.attrs.gid = attrs.gid;
        }
        Ok(())
    }

    fn set_mtime(&mut self, _: &Namespace, _: Ino, _: Nanos) -> Result<(), ReplayError> {
        Ok(())
    }

    fn set_xattr(
        &mut self,
        _: &Namespace,
        ino: Ino,
        name: &[u8],
        value: &[u8],
    ) -> Result<(), ReplayError> {
        if let Some(o) = self.objects.get_mut(&ino) {
            if matches!(o.kind, Kind::File | Kind::Dir) {
                o.xattrs
                    .insert(Bytes::copy_from_slice(name), Bytes::copy_from_slice(value));
            }
        }
        Ok(())
    }

    fn remove_xattr(&mut self, _: &Namespace, ino: Ino, name: &[u8]) -> Result<(), ReplayError> {
        if let Some(o) = self.objects.get_mut(&ino) {
            o.xattrs.remove(name);
        }
        Ok(())
    }
}
