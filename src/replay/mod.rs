//! Replay: how a record changes a tree. It owns the namespace model (which
//! identities exist, their kinds, where each directory is, the names of
//! every other object, sizes and mtimes) and the per-record decisions (a
//! rename between two links of one file does nothing, an exchange applies
//! as one only when both sides are what the record says, a record racing
//! the base walk may name a file the walk never saw, a redone create that
//! already happened is a no-op, ...). It turns each decision into a few
//! primitive effects on a target (`Effects`): the restore's directory
//! (`restore.rs`), the source directory that `redo` repairs after a crash,
//! and the in-memory tree (`memory.rs`) that `diff` builds on. It must not
//! do I/O itself: where files are on a disk and how a name is made safe to
//! open are the targets' business.
//!
//! # Policies
//! A restore and the in-memory tree replay onto a state they built
//! themselves, so a record whose premise does not hold there is an
//! inconsistent timeline, or the base walk's fuzziness (`Policy::Exact`).
//! Redo replays onto a source that is some mix of the journal's states
//! after a power loss: a namespace record applies only when its premise
//! holds, and is skipped otherwise, so one that already happened is a
//! no-op (`Policy::Converge`). Data records are absolute effects and apply
//! under both.

pub(crate) mod memory;

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::base::{safe_name, Link, Object};
use crate::clock::Nanos;
use crate::layout::HIDDEN;
use crate::record::{Ino, Kind, Op, Record, RENAME_EXCHANGE_FLAG};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "refusing hostile or invalid name {name:?} in {what}: names must be one path component"
    )]
    HostileName { name: String, what: String },
    #[error("the timeline is inconsistent at record {seq}: {why}")]
    Inconsistent { seq: u64, why: String },
}

/// A name in a directory: one path component, checked by `checked_name`.
pub(crate) type Name = Bytes;

/// Mode bits (permissions and set-id bits, without the type), owner, group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attrs {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// One identity of the model.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    /// Directories: where it is; None while it has no name.
    pub(crate) place: Option<(Ino, Name)>,
    /// Non-directories: the names that link to it.
    pub(crate) links: HashSet<(Ino, Name)>,
    /// Regular files: the mtime their last record left, if any.
    pub(crate) mtime: Option<Nanos>,
    pub(crate) size: u64,
    /// Directories: how many entries they hold.
    children: usize,
}

impl Node {
    fn new(kind: Kind) -> Node {
        Node {
            kind,
            place: None,
            links: HashSet::new(),
            mtime: None,
            size: 0,
            children: 0,
        }
    }
}

/// The namespace model: identities and the entries that name them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Namespace {
    root: Ino,
    nodes: HashMap<Ino, Node>,
    entries: HashMap<(Ino, Name), Ino>,
    /// Records timed before this ran while the base was walked: one may
    /// name a file that died before the walk could see it (written, then
    /// replaced or unlinked and closed). Such records only remove entries.
    fuzzy_until: Nanos,
    /// Identities handed out to objects whose identity a redone create
    /// took over (see `Replay::create_converge`), counting down from the top.
    ghosts: u64,
}

impl Namespace {
    pub(crate) fn root(&self) -> Ino {
        self.root
    }

    pub(crate) fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub(crate) fn nodes(&self) -> impl Iterator<Item = (Ino, &Node)> {
        self.nodes.iter().map(|(i, n)| (*i, n))
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.entries
            .get(&(parent, Bytes::copy_from_slice(name)))
            .copied()
    }

    /// The entries of directory `dir`, sorted by name.
    pub(crate) fn children(&self, dir: Ino) -> Vec<(Name, Ino)> {
        if self.nodes.get(&dir).is_none_or(|n| n.children == 0) {
            return Vec::new();
        }
        let mut out: Vec<(Name, Ino)> = self
            .entries
            .iter()
            .filter(|((p, _), _)| *p == dir)
            .map(|((_, n), c)| (n.clone(), *c))
            .collect();
        out.sort();
        out
    }

    /// The names from the root to directory `dir`, if it is in the tree.
    pub(crate) fn dir_path(&self, dir: Ino) -> Option<Vec<Name>> {
        let mut parts = Vec::new();
        let mut at = dir;
        while at != self.root {
            let (p, n) = self.nodes.get(&at)?.place.clone()?;
            parts.push(n);
            at = p;
            if parts.len() > 4096 {
                return None;
            }
        }
        parts.reverse();
        Some(parts)
    }

    /// The names from the root to `ino` (for a non-directory, through its
    /// smallest name), if it is in the tree.
    pub(crate) fn path(&self, ino: Ino) -> Option<Vec<Name>> {
        let node = self.nodes.get(&ino)?;
        if node.kind == Kind::Dir {
            return self.dir_path(ino);
        }
        let (p, n) = node.links.iter().min()?.clone();
        let mut parts = self.dir_path(p)?;
        parts.push(n);
        Some(parts)
    }

    /// The path of entry `name` in `parent`, relative to the root and
    /// joined with '/', if that directory is in the tree.
    pub(crate) fn entry_path(&self, parent: Ino, name: &[u8]) -> Option<String> {
        let mut parts: Vec<String> = self
            .dir_path(parent)?
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        parts.push(String::from_utf8_lossy(name).into_owned());
        Some(parts.join("/"))
    }

    fn add_name(&mut self, parent: Ino, name: Name, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.kind == Kind::Dir {
                n.place = Some((parent, name.clone()));
            } else {
                n.links.insert((parent, name.clone()));
            }
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children += 1;
        }
        self.entries.insert((parent, name), ino);
    }

    fn drop_name(&mut self, parent: Ino, name: &Name) -> Option<Ino> {
        let ino = self.entries.remove(&(parent, name.clone()))?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.kind == Kind::Dir {
                n.place = None;
            } else {
                n.links.remove(&(parent, name.clone()));
            }
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children -= 1;
        }
        Some(ino)
    }

    /// Gives the object known as `ino` a fresh identity, names included,
    /// and returns it.
    fn rekey(&mut self, ino: Ino) -> Option<Ino> {
        let inside = self.children(ino);
        let node = self.nodes.remove(&ino)?;
        self.ghosts += 1;
        let ghost = u64::MAX - self.ghosts;
        for e in self.entries.values_mut() {
            if *e == ino {
                *e = ghost;
            }
        }
        if node.kind == Kind::Dir {
            for (n, c) in inside {
                self.entries.remove(&(ino, n.clone()));
                self.entries.insert((ghost, n.clone()), c);
                if let Some(child) = self.nodes.get_mut(&c) {
                    if child.kind == Kind::Dir {
                        child.place = Some((ghost, n));
                    } else {
                        child.links.remove(&(ino, n.clone()));
                        child.links.insert((ghost, n));
                    }
                }
            }
        }
        self.nodes.insert(ghost, node);
        Some(ghost)
    }
}

/// The primitive effects a replay has on its target. Each call sees the
/// model as it was before the effect (`make` excepted: the new identity is
/// in the model, without names). A target keeps what the model does not:
/// contents, modes, owners, xattrs, and where its objects live.
pub(crate) trait Effects {
    type Error: From<ReplayError>;
    /// Makes a new object with no name.
    #[allow(clippy::too_many_arguments)]
    fn make(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        kind: Kind,
        attrs: Attrs,
        rdev: u64,
        target: &[u8],
    ) -> Result<(), Self::Error>;
    /// Names `ino` (parent, name), which is free. A directory moves there
    /// from where the model says it is.
    fn link(
        &mut self,
        ns: &Namespace,
        parent: Ino,
        name: &[u8],
        ino: Ino,
    ) -> Result<(), Self::Error>;
    /// Removes the name (parent, name) of `ino`; a directory loses its only
    /// name but lives on (empty, or its entries are removed first).
    fn unlink(
        &mut self,
        ns: &Namespace,
        parent: Ino,
        name: &[u8],
        ino: Ino,
    ) -> Result<(), Self::Error>;
    /// Moves `ino` from one name to another, replacing `over` (a file or an
    /// empty directory) when the second name was taken.
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        ns: &Namespace,
        from: (Ino, &[u8]),
        to: (Ino, &[u8]),
        ino: Ino,
        over: Option<Ino>,
    ) -> Result<(), Self::Error>;
    /// Swaps what two names name.
    fn exchange(
        &mut self,
        ns: &Namespace,
        a: (Ino, &[u8]),
        b: (Ino, &[u8]),
    ) -> Result<(), Self::Error>;
    /// The object known as `old` is known as `new` from now on (its names
    /// are unchanged).
    fn renumber(&mut self, ns: &Namespace, old: Ino, new: Ino) -> Result<(), Self::Error>;
    /// Ends an identity that has no names left.
    fn discard(&mut self, ns: &Namespace, ino: Ino) -> Result<(), Self::Error>;
    fn write(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Self::Error>;
    fn set_size(&mut self, ns: &Namespace, ino: Ino, size: u64) -> Result<(), Self::Error>;
    fn fallocate(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        mode: u32,
        offset: u64,
        len: u64,
    ) -> Result<(), Self::Error>;
    fn set_attrs(&mut self, ns: &Namespace, ino: Ino, attrs: Attrs) -> Result<(), Self::Error>;
    /// A regular file's mtime; the model keeps the last one too, for
    /// targets that set mtimes once at the end.
    fn set_mtime(&mut self, ns: &Namespace, ino: Ino, mtime: Nanos) -> Result<(), Self::Error>;
    fn set_xattr(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        name: &[u8],
        value: &[u8],
    ) -> Result<(), Self::Error>;
    fn remove_xattr(&mut self, ns: &Namespace, ino: Ino, name: &[u8]) -> Result<(), Self::Error>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// The target is the model's own state: a broken premise is an error.
    Exact,
    /// The target may be ahead of the records: a broken premise skips.
    Converge,
}

/// What applying one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Applied,
    /// Its premise did not hold (`Policy::Converge`), or it named a file
    /// that died during the base walk.
    Skipped,
    /// A create that made a new object (under `Converge`: one the target
    /// had lost).
    Created,
}

/// Why a name is refused, or the checked name.
pub(crate) fn checked_name(name: &[u8], what: &str) -> Result<Name, ReplayError> {
    match safe_name(name) {
        Some(_) => Ok(Bytes::copy_from_slice(name)),
        None => Err(ReplayError::HostileName {
            name: String::from_utf8_lossy(name).into_owned(),
            what: what.into(),
        }),
    }
}

/// Whether a rename may go ahead under `Policy::Converge`, given what the
/// model holds at its target: the kernel refuses to put a directory over
/// a non-directory, a non-directory over a directory, or anything over a
/// directory that is not empty.
pub(crate) fn rename_fits(moving: Kind, over: Option<(Kind, usize)>) -> bool {
    match over {
        None => true,
        Some((Kind::Dir, children)) => moving == Kind::Dir && children == 0,
        Some(_) => moving != Kind::Dir,
    }
}

/// Whether a file's size on the target must be set: it differs from what
/// the model holds, or it is zero (cheap, and it drops any preallocation).
pub(crate) fn needs_resize(model: u64, size: u64) -> bool {
    model != size || size == 0
}

/// Whether `path` is `under` or inside it ("" is the whole tree); paths
/// are relative to the root, joined with '/'.
pub(crate) fn within(path: &str, under: &str) -> bool {
    under.is_empty()
        || path == under
        || (path.starts_with(under) && path.as_bytes().get(under.len()) == Some(&b'/'))
}

/// A path as a user gives it, made relative to the root ("." and empty
/// components dropped).
pub(crate) fn clean_path(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// A replay: the model and the target it drives.
pub(crate) struct Replay<T: Effects> {
    pub(crate) ns: Namespace,
    pub(crate) target: T,
    policy: Policy,
    /// When set, only these identities get file data (writes, base data,
    /// fallocate); every other one keeps its size, sparse. A restore of a
    /// few paths sets it to the identities under them.
    data_for: Option<HashSet<Ino>>,
}

type Res<T, E> = std::result::Result<T, E>;

impl<T: Effects> Replay<T> {
    pub(crate) fn new(target: T, policy: Policy) -> Replay<T> {
        Replay {
            ns: Namespace {
                fuzzy_until: i64::MIN,
                ..Namespace::default()
            },
            target,
            policy,
            data_for: None,
        }
    }

    /// Limits file data to `inos` (see `data_for`).
    pub(crate) fn limit_data(&mut self, inos: HashSet<Ino>) {
        self.data_for = Some(inos);
    }

    /// Whether identity `ino` gets its file data.
    pub(crate) fn wants_data(&self, ino: Ino) -> bool {
        self.data_for.as_ref().is_none_or(|s| s.contains(&ino))
    }

    /// Declares the time until which records raced the base walk.
    pub(crate) fn set_fuzzy_until(&mut self, ns: Nanos) {
        self.ns.fuzzy_until = ns;
    }

    /// Starts the model with its root directory, which the target holds.
    pub(crate) fn set_root(&mut self, root: Ino) {
        self.ns.root = root;
        self.ns.nodes.insert(root, Node::new(Kind::Dir));
    }

    /// Adds an object the target holds already (redo's walk of the source)
    /// under the name (parent, name), or only the name if it is known.
    pub(crate) fn seed(&mut self, parent: Ino, name: Name, ino: Ino, kind: Kind, size: u64) {
        self.ns.nodes.entry(ino).or_insert_with(|| {
            let mut n = Node::new(kind);
            n.size = size;
            n
        });
        self.ns.add_name(parent, name, ino);
    }

    fn reserved(&self, parent: Ino, name: &[u8]) -> bool {
        parent == self.ns.root && name == HIDDEN.as_bytes()
    }

    fn refuse_reserved(&self, parent: Ino, name: &[u8], what: &str) -> Res<(), T::Error> {
        if self.reserved(parent, name) {
            return Err(ReplayError::HostileName {
                name: HIDDEN.into(),
                what: format!("{what} (reserved name)"),
            }
            .into());
        }
        Ok(())
    }

    fn unknown(&self, ino: Ino, seq: u64) -> ReplayError {
        ReplayError::Inconsistent {
            seq,
            why: format!("names file {ino}, which the base and earlier records never created"),
        }
    }

    /// A base manifest's object, without its data: made (the root only
    /// takes its attributes), with its xattrs.
    pub(crate) fn base_object(&mut self, o: &Object) -> Res<(), T::Error> {
        let attrs = Attrs {
            mode: o.mode,
            uid: o.uid,
            gid: o.gid,
        };
        if o.ino == self.ns.root {
            self.target.set_attrs(&self.ns, o.ino, attrs)?;
        } else {
            self.create(o.ino, o.kind, attrs, o.rdev, &o.target)?;
        }
        for (k, v) in &o.xattrs {
            self.target.set_xattr(&self.ns, o.ino, k, v)?;
        }
        Ok(())
    }

    /// A base file's size and mtime, once its data is written.
    pub(crate) fn base_file_done(&mut self, o: &Object) -> Res<(), T::Error> {
        self.set_size(o.ino, o.size)?;
        self.set_mtime(o.ino, o.mtime)
    }

    /// A base manifest's names, placed top-down so every parent directory
    /// is in the tree first. Names under directories that are not in the
    /// tree (a fuzzy walk) are placed last; later records place their
    /// parents.
    pub(crate) fn base_links(&mut self, links: &[Link]) -> Res<(), T::Error> {
        let mut pending: Vec<&Link> = links.iter().collect();
        loop {
            let before = pending.len();
            let mut rest = Vec::new();
            for l in pending {
                let name = checked_name(&l.name, "base manifest")?;
                self.refuse_reserved(l.parent, &name, "base manifest")?;
                let parent_placed = l.parent == self.ns.root
                    || self
                        .ns
                        .nodes
                        .get(&l.parent)
                        .is_some_and(|n| n.place.is_some());
                if parent_placed {
                    self.ensure_entry(l.parent, name, l.ino, 0)?;
                } else {
                    rest.push(l);
                }
            }
            if rest.is_empty() || rest.len() == before {
                for l in rest {
                    let name = checked_name(&l.name, "base manifest")?;
                    self.ensure_entry(l.parent, name, l.ino, 0)?;
                }
                return Ok(());
            }
            pending = rest;
        }
    }

    /// Makes a fresh object; an existing object with the same identity is
    /// an earlier, dead inode (or a fuzzy-base copy) and is discarded.
    fn create(
        &mut self,
        ino: Ino,
        kind: Kind,
        attrs: Attrs,
        rdev: u64,
        target: &[u8],
    ) -> Res<(), T::Error> {
        if self.ns.nodes.contains_key(&ino) {
            self.discard(ino)?;
        }
        self.ns.nodes.insert(ino, Node::new(kind));
        self.target.make(&self.ns, ino, kind, attrs, rdev, target)
    }

    /// Removes every name of `ino` and ends it. A directory's entries leave
    /// the tree with it: directories among them lose their name (they live
    /// on without one), the names of other objects are removed.
    fn discard(&mut self, ino: Ino) -> Res<(), T::Error> {
        if !self.ns.nodes.contains_key(&ino) {
            return Ok(());
        }
        for (n, _) in self.ns.children(ino) {
            self.remove_entry(ino, &n)?;
        }
        self.unlink_all(ino)?;
        self.target.discard(&self.ns, ino)?;
        self.ns.nodes.remove(&ino);
        Ok(())
    }

    /// Removes the entry (parent, name), whatever it names.
    pub(crate) fn remove_entry(&mut self, parent: Ino, name: &Name) -> Res<(), T::Error> {
        let Some(ino) = self.ns.lookup(parent, name) else {
            return Ok(());
        };
        self.target.unlink(&self.ns, parent, name, ino)?;
        self.ns.drop_name(parent, name);
        Ok(())
    }

    /// Makes (parent, name) name `ino`, replacing what was there.
    fn ensure_entry(&mut self, parent: Ino, name: Name, ino: Ino, seq: u64) -> Res<(), T::Error> {
        if self.ns.lookup(parent, &name) == Some(ino) {
            return Ok(());
        }
        let Some(node) = self.ns.nodes.get(&ino) else {
            return Err(ReplayError::Inconsistent {
                seq,
                why: format!(
                    "names file {ino}, which neither the base nor an earlier record created"
                ),
            }
            .into());
        };
        let old_place = node.place.clone();
        self.remove_entry(parent, &name)?;
        self.target.link(&self.ns, parent, &name, ino)?;
        if let Some((p, n)) = old_place {
            self.ns.drop_name(p, &n);
        }
        self.ns.add_name(parent, name, ino);
        Ok(())
    }

    fn set_size(&mut self, ino: Ino, size: u64) -> Res<(), T::Error> {
        let Some(n) = self.ns.nodes.get(&ino) else {
            return Ok(());
        };
        if needs_resize(n.size, size) {
            self.target.set_size(&self.ns, ino, size)?;
            self.ns.nodes.get_mut(&ino).unwrap().size = size;
        }
        Ok(())
    }

    fn set_mtime(&mut self, ino: Ino, mtime: Nanos) -> Res<(), T::Error> {
        self.target.set_mtime(&self.ns, ino, mtime)?;
        if let Some(n) = self.ns.nodes.get_mut(&ino) {
            n.mtime = Some(mtime);
        }
        Ok(())
    }

    /// Grows the model's size of a file after bytes landed up to `end`.
    fn grew_to(&mut self, ino: Ino, end: u64) {
        if let Some(n) = self.ns.nodes.get_mut(&ino) {
            n.size = n.size.max(end);
        }
    }

    /// Removes every name of `ino`, which lives on without one.
    pub(crate) fn unlink_all(&mut self, ino: Ino) -> Res<(), T::Error> {
        let Some(node) = self.ns.nodes.get(&ino) else {
            return Ok(());
        };
        let mut names: Vec<(Ino, Name)> = match node.kind {
            Kind::Dir => node.place.iter().cloned().collect(),
            _ => node.links.iter().cloned().collect(),
        };
        names.sort();
        for (p, n) in names {
            self.remove_entry(p, &n)?;
        }
        Ok(())
    }

    /// The file a record names, if the record raced the base walk and names
    /// a file the walk never saw because it no longer existed at the end.
    fn died_during_walk(&self, rec: &Record) -> Option<Ino> {
        if rec.time > self.ns.fuzzy_until {
            return None;
        }
        // A create makes its identity, so it never names a dead one.
        let ino = match &rec.op {
            Op::Link { ino, .. } | Op::Rename { ino, .. } | Op::Unlink { ino, .. } => *ino,
            op => op.data_ino()?,
        };
        // A data record for an identity the base holds as something other
        // than a file: the number was reused during the walk (the later
        // Create record replaces it).
        let wants_file = matches!(rec.op, Op::Write { .. } | Op::Fallocate { .. });
        match self.ns.nodes.get(&ino) {
            None => Some(ino),
            Some(n) if wants_file && n.kind != Kind::File => Some(ino),
            Some(_) => None,
        }
    }

    /// The node a data record names: under `Exact` it must exist; under
    /// `Converge` a missing one (or one of another kind than `want`) skips.
    fn subject(&self, ino: Ino, seq: u64, want: Option<Kind>) -> Res<Option<Kind>, T::Error> {
        match (self.ns.nodes.get(&ino), self.policy) {
            (None, Policy::Exact) => Err(self.unknown(ino, seq).into()),
            (None, Policy::Converge) => Ok(None),
            (Some(n), Policy::Converge) if want.is_some_and(|k| k != n.kind) => Ok(None),
            (Some(n), _) => Ok(Some(n.kind)),
        }
    }

    /// Applies one record.
    pub(crate) fn apply(&mut self, rec: &Record) -> Res<Outcome, T::Error> {
        let seq = rec.seq;
        if self.died_during_walk(rec).is_some() {
            self.apply_dead(rec)?;
            return Ok(Outcome::Skipped);
        }
        let skipped = |applied: bool| {
            if applied {
                Outcome::Applied
            } else {
                Outcome::Skipped
            }
        };
        match &rec.op {
            Op::Create {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                mtime,
                rdev,
                target,
            } => {
                let n = checked_name(name, "segment")?;
                self.refuse_reserved(*parent, name, "segment")?;
                let attrs = Attrs {
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                };
                match self.policy {
                    Policy::Exact => {
                        if !self.ns.nodes.contains_key(parent) {
                            return Err(self.unknown(*parent, seq).into());
                        }
                    }
                    Policy::Converge => {
                        if !self.create_fits(*parent, &n, *ino) {
                            return Ok(Outcome::Skipped);
                        }
                        self.remove_entry(*parent, &n)?;
                        // The object that holds the identity elsewhere is
                        // not the one the journal created: it keeps its
                        // names under an identity of its own.
                        if let Some(ghost) = self.ns.rekey(*ino) {
                            self.target.renumber(&self.ns, *ino, ghost)?;
                        }
                    }
                }
                self.create(*ino, *kind, attrs, *rdev, target)?;
                self.ensure_entry(*parent, n, *ino, seq)?;
                if *kind == Kind::File {
                    self.set_mtime(*ino, *mtime)?;
                }
                Ok(Outcome::Created)
            }
            Op::Link { ino, parent, name } => {
                let n = checked_name(name, "segment")?;
                self.refuse_reserved(*parent, name, "segment")?;
                if self.policy == Policy::Converge {
                    let fits = self
                        .ns
                        .nodes
                        .get(parent)
                        .is_some_and(|p| p.kind == Kind::Dir)
                        && self.ns.nodes.get(ino).is_some_and(|n| n.kind != Kind::Dir)
                        && self.ns.path(*ino).is_some()
                        && self.ns.lookup(*parent, &n).is_none();
                    if !fits {
                        return Ok(Outcome::Skipped);
                    }
                }
                self.ensure_entry(*parent, n, *ino, seq)?;
                Ok(Outcome::Applied)
            }
            Op::Unlink { parent, name, ino } => {
                let n = checked_name(name, "segment")?;
                let names_it = self.ns.lookup(*parent, &n) == Some(*ino);
                // A directory the journal saw emptied may hold entries it
                // never saw on a source after a crash: it stays.
                let full = self.policy == Policy::Converge
                    && self.ns.nodes.get(ino).is_some_and(|n| n.children > 0);
                if names_it && !full {
                    self.remove_entry(*parent, &n)?;
                }
                Ok(skipped(names_it && !full))
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                ino,
                replaced,
                flags,
            } => {
                let from = checked_name(from_name, "segment")?;
                let to = checked_name(to_name, "segment")?;
                self.refuse_reserved(*to_parent, to_name, "segment")?;
                self.refuse_reserved(*from_parent, from_name, "segment")?;
                let exchange = flags & RENAME_EXCHANGE_FLAG != 0;
                match self.policy {
                    Policy::Exact => {
                        self.rename_exact(
                            seq,
                            (*from_parent, from),
                            (*to_parent, to),
                            *ino,
                            *replaced,
                            exchange,
                        )?;
                        Ok(Outcome::Applied)
                    }
                    Policy::Converge => {
                        let done = self.rename_converge(
                            (*from_parent, from),
                            (*to_parent, to),
                            *ino,
                            exchange,
                        )?;
                        Ok(skipped(done))
                    }
                }
            }
            Op::Write {
                ino,
                offset,
                size,
                mtime,
                data,
            } => {
                if self.subject(*ino, seq, Some(Kind::File))?.is_none() {
                    return Ok(Outcome::Skipped);
                }
                if self.wants_data(*ino) {
                    self.target.write(&self.ns, *ino, *offset, data)?;
                }
                self.grew_to(*ino, offset + data.len() as u64);
                self.set_size(*ino, *size)?;
                self.set_mtime(*ino, *mtime)?;
                Ok(Outcome::Applied)
            }
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                mtime,
            } => {
                let Some(kind) = self.subject(*ino, seq, None)? else {
                    return Ok(Outcome::Skipped);
                };
                let attrs = Attrs {
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                };
                self.target.set_attrs(&self.ns, *ino, attrs)?;
                if kind == Kind::File {
                    self.set_size(*ino, *size)?;
                    self.set_mtime(*ino, *mtime)?;
                }
                Ok(Outcome::Applied)
            }
            Op::Fallocate {
                ino,
                mode,
                offset,
                len,
                size,
                mtime,
            } => {
                if self.subject(*ino, seq, Some(Kind::File))?.is_none() {
                    return Ok(Outcome::Skipped);
                }
                if self.wants_data(*ino) {
                    self.target
                        .fallocate(&self.ns, *ino, *mode, *offset, *len)?;
                }
                if mode & crate::record::falloc::KEEP_SIZE == 0 {
                    self.grew_to(*ino, offset + len);
                }
                self.set_size(*ino, *size)?;
                self.set_mtime(*ino, *mtime)?;
                Ok(Outcome::Applied)
            }
            Op::SetXattr { ino, name, value } => {
                if self.subject(*ino, seq, None)?.is_none() {
                    return Ok(Outcome::Skipped);
                }
                self.target.set_xattr(&self.ns, *ino, name, value)?;
                Ok(Outcome::Applied)
            }
            Op::RemoveXattr { ino, name } => {
                if self.subject(*ino, seq, None)?.is_none() {
                    return Ok(Outcome::Skipped);
                }
                self.target.remove_xattr(&self.ns, *ino, name)?;
                Ok(Outcome::Applied)
            }
            Op::ClockStep { .. } => Ok(Outcome::Applied),
        }
    }

    /// A record about a file that died during the base walk: only its
    /// effect on other entries matters. A rename of the dead file still
    /// replaced whatever stood at its target (or, as an exchange, moved the
    /// other file to its source).
    fn apply_dead(&mut self, rec: &Record) -> Res<(), T::Error> {
        if let Op::Rename {
            from_parent,
            from_name,
            to_parent,
            to_name,
            replaced,
            flags,
            ..
        } = &rec.op
        {
            let from = checked_name(from_name, "segment")?;
            let to = checked_name(to_name, "segment")?;
            self.remove_entry(*to_parent, &to)?;
            if flags & RENAME_EXCHANGE_FLAG != 0 && self.ns.nodes.contains_key(replaced) {
                self.ensure_entry(*from_parent, from, *replaced, rec.seq)?;
            }
        }
        Ok(())
    }

    /// Whether a redone create can go ahead: its directory is in the tree,
    /// it did not happen already, and no directory holds its name (a
    /// directory in the way is not ours to remove).
    fn create_fits(&self, parent: Ino, name: &Name, ino: Ino) -> bool {
        if self
            .ns
            .nodes
            .get(&parent)
            .is_none_or(|p| p.kind != Kind::Dir)
        {
            return false;
        }
        match self.ns.lookup(parent, name) {
            Some(there) if there == ino => false,
            Some(there) => {
                let dir = self
                    .ns
                    .nodes
                    .get(&there)
                    .is_some_and(|n| n.kind == Kind::Dir);
                if dir {
                    tracing::warn!(
                        parent,
                        name = %String::from_utf8_lossy(name),
                        "redo: a directory occupies the name of a created file; left as is"
                    );
                }
                !dir
            }
            None => true,
        }
    }

    fn rename_exact(
        &mut self,
        seq: u64,
        (fp, from): (Ino, Name),
        (tp, to): (Ino, Name),
        ino: Ino,
        replaced: Ino,
        exchange: bool,
    ) -> Res<(), T::Error> {
        if ino == replaced && !exchange {
            // rename(2) between two links of one file does nothing.
            return Ok(());
        }
        let a = self.ns.lookup(fp, &from);
        let b = self.ns.lookup(tp, &to);
        if exchange {
            if a == Some(ino) && b == Some(replaced) {
                self.exchange((fp, from), (tp, to))
            } else {
                // One side is not what the record says (the base walk saw
                // it mid-change): each name ends up naming its file.
                self.remove_entry(fp, &from)?;
                self.ensure_entry(tp, to, ino, seq)?;
                self.ensure_entry(fp, from, replaced, seq)
            }
        } else if a == Some(ino) {
            self.rename((fp, from), (tp, to), ino, b)
        } else {
            self.ensure_entry(tp, to, ino, seq)
        }
    }

    /// A redone rename: it applies when its source still names the file,
    /// and when the kernel would let it (see `rename_fits`).
    fn rename_converge(
        &mut self,
        (fp, from): (Ino, Name),
        (tp, to): (Ino, Name),
        ino: Ino,
        exchange: bool,
    ) -> Res<bool, T::Error> {
        let to_dir = self.ns.nodes.get(&tp).is_some_and(|n| n.kind == Kind::Dir);
        if self.ns.lookup(fp, &from) != Some(ino) || !to_dir {
            return Ok(false);
        }
        let there = self.ns.lookup(tp, &to);
        if exchange {
            if there.is_none() {
                return Ok(false);
            }
            self.exchange((fp, from), (tp, to))?;
            return Ok(true);
        }
        if there == Some(ino) {
            return Ok(true);
        }
        let kind = self.ns.nodes[&ino].kind;
        let over = there.and_then(|t| self.ns.nodes.get(&t).map(|n| (n.kind, n.children)));
        if !rename_fits(kind, over) {
            return Ok(false);
        }
        self.rename((fp, from), (tp, to), ino, there)?;
        Ok(true)
    }

    fn rename(
        &mut self,
        (fp, from): (Ino, Name),
        (tp, to): (Ino, Name),
        ino: Ino,
        over: Option<Ino>,
    ) -> Res<(), T::Error> {
        self.target
            .rename(&self.ns, (fp, &from), (tp, &to), ino, over)?;
        self.ns.drop_name(tp, &to);
        self.ns.drop_name(fp, &from);
        self.ns.add_name(tp, to, ino);
        Ok(())
    }

    fn exchange(&mut self, (fp, from): (Ino, Name), (tp, to): (Ino, Name)) -> Res<(), T::Error> {
        self.target.exchange(&self.ns, (fp, &from), (tp, &to))?;
        let a = self.ns.drop_name(fp, &from);
        let b = self.ns.drop_name(tp, &to);
        if let Some(b) = b {
            self.ns.add_name(fp, from, b);
        }
        if let Some(a) = a {
            self.ns.add_name(tp, to, a);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
