//! The mountpoint: what sits at `--mount` under and around Rewind's FUSE
//! mount. It owns reading the stack of mounts at that path, clearing a dead
//! FUSE mount an earlier run left on top, and the read-only *guard*: a
//! tmpfs mounted read-only at the mountpoint beneath the FUSE mount, so that
//! when the FUSE mount goes (a stop detaches it lazily) an application that
//! still writes to the path gets EROFS instead of writing, unprotected and
//! unjournaled, into the bare directory that the next start hides again.
//! Only mounts this module recognises as Rewind's are ever detached: the
//! mountpoint may itself be a mount (in a pod it is the `emptyDir` the
//! sidecar shares with the application), and detaching that would cut the
//! application off. It must not touch fuser or the passthrough core.

use std::path::Path;

/// The `source` of the FUSE mount (its `FSName`). Its type is `fuse` when
/// the daemon mounts by itself and `fuse.rewind` through fusermount3.
pub(crate) const FUSE_SOURCE: &str = "rewind";
/// The `source` field of the guard's tmpfs, which is how a later run
/// recognises it in mountinfo.
pub(crate) const GUARD_SOURCE: &str = "rewind-guard";

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error("cannot detach the dead mount an earlier run left at {path}: {source}")]
    Detach {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

/// One mount at the mountpoint, as mountinfo describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mounted {
    pub id: u64,
    pub parent: u64,
    pub fstype: String,
    pub source: String,
}

impl Mounted {
    fn is_fuse(&self) -> bool {
        (self.fstype == "fuse" || self.fstype == "fuse.rewind") && self.source == FUSE_SOURCE
    }
    fn is_guard(&self) -> bool {
        self.fstype == "tmpfs" && self.source == GUARD_SOURCE
    }
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts at exactly `path`, bottom first. Mounts stacked at one path
/// each have the one below as their parent, which gives the order even
/// when mountinfo lists them out of it.
pub(crate) fn stack(mountinfo: &str, path: &Path) -> Vec<Mounted> {
    let want = path.to_string_lossy();
    let mut at: Vec<Mounted> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            if f.len() < 5 || unescape(f[4]) != want {
                return None;
            }
            let mut r = right.split(' ');
            Some(Mounted {
                id: f[0].parse().ok()?,
                parent: f[1].parse().ok()?,
                fstype: r.next()?.to_string(),
                source: unescape(r.next().unwrap_or("")),
            })
        })
        .collect();
    let mut ordered = Vec::with_capacity(at.len());
    // The bottom is the one whose parent is not at this path.
    while let Some(i) = at.iter().position(|m| {
        ordered.last().map_or(
            !at.iter().any(|o: &Mounted| o.id == m.parent),
            |top: &Mounted| m.parent == top.id,
        )
    }) {
        ordered.push(at.swap_remove(i));
    }
    // Anything left is not in one chain (a shape the kernel does not make);
    // keep it on top so the plan sees it and refuses.
    ordered.extend(at);
    ordered
}

/// What a start does at the mountpoint before it mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Dead FUSE mounts of earlier runs to detach from the top.
    pub detach: usize,
    /// Whether the guard must be mounted (it is not there yet).
    pub mount_guard: bool,
}

/// Decides what to do with the stack of mounts at the mountpoint, bottom
/// first. Rewind's FUSE mounts on top are an earlier run's (the journal
/// lock already proved no other daemon runs on this journal) and are
/// detached; one guard is kept, or made when there is none; anything else
/// on top of Rewind's own mounts is someone else's, and is refused rather
/// than mounted over or detached.
pub(crate) fn plan(stack: &[Mounted]) -> Result<Plan, String> {
    let detach = stack.iter().rev().take_while(|m| m.is_fuse()).count();
    let rest = &stack[..stack.len() - detach];
    let guards = rest.iter().filter(|m| m.is_guard()).count();
    match rest.last() {
        Some(top) if top.is_guard() => Ok(Plan {
            detach,
            mount_guard: false,
        }),
        _ if guards > 0 || rest.iter().any(Mounted::is_fuse) => Err(format!(
            "the mountpoint holds a mount of Rewind's under a mount that is not ({}); unmount what is on top before starting",
            rest.iter()
                .map(|m| format!("{} {}", m.fstype, m.source))
                .collect::<Vec<_>>()
                .join(" < ")
        )),
        _ => Ok(Plan {
            detach,
            mount_guard: true,
        }),
    }
}

fn mountinfo() -> Result<String, GuardError> {
    std::fs::read_to_string("/proc/self/mountinfo").map_err(GuardError::MountInfo)
}

/// Detaches what earlier runs left dead on top of the mountpoint, so that
/// the path can be checked and mounted again; refuses a stack with a
/// foreign mount over Rewind's own.
pub(crate) fn clear_dead(path: &Path) -> Result<(), GuardError> {
    let plan = plan(&stack(&mountinfo()?, path)).map_err(GuardError::Refused)?;
    for _ in 0..plan.detach {
        tracing::warn!(mount = %path.display(), "detaching a dead mount left by an earlier run");
        rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
            GuardError::Detach {
                path: path.display().to_string(),
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

/// Puts the guard at the mountpoint unless one is there already; called
/// right before the FUSE mount, once every check has passed. A guard that
/// cannot be mounted (no CAP_SYS_ADMIN) is logged and protection goes on
/// without it.
pub(crate) fn ensure_guard(path: &Path) -> Result<(), GuardError> {
    let plan = plan(&stack(&mountinfo()?, path)).map_err(GuardError::Refused)?;
    if plan.mount_guard {
        use rustix::mount::{mount, MountFlags};
        let flags =
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        match mount(GUARD_SOURCE, path, "tmpfs", flags, c"mode=0555,size=4k") {
            Ok(()) => tracing::info!(
                mount = %path.display(),
                "mounted the read-only guard under the mount: once the mount is gone, writes to this path fail with EROFS"
            ),
            Err(e) => tracing::warn!(
                mount = %path.display(),
                "cannot mount the read-only guard ({e}); after a stop, writes to this path would land unprotected in the directory under the mount"
            ),
        }
    }
    Ok(())
}

/// Detaches Rewind's FUSE mount lazily if it is the top of the stack at
/// `path` (open files go on being served), so that the guard beneath is
/// what the path reaches from now on. Anything else at the path is left.
pub(crate) fn detach_fuse(path: &Path) {
    if !fuse_on_top(path) {
        return;
    }
    if let Err(e) = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        tracing::warn!(mount = %path.display(), "cannot detach the mount: {e}");
    }
}

/// Whether Rewind's FUSE mount is the top of the stack at `path`: the wait
/// for a stop signal ends when something detached it.
pub(crate) fn fuse_on_top(path: &Path) -> bool {
    mountinfo()
        .map(|mi| stack(&mi, path).last().is_some_and(Mounted::is_fuse))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, parent: u64, fstype: &str, source: &str) -> Mounted {
        Mounted {
            id,
            parent,
            fstype: fstype.into(),
            source: source.into(),
        }
    }

    #[test]
    fn stack_orders_by_parent_and_reads_only_the_path() {
        let mi = "\
30 1 0:5 / / rw - ext4 /dev/vda rw
52 30 0:40 / /data/mnt rw - ext4 /dev/vda rw
60 54 0:42 / /data/mnt rw,nosuid - fuse.rewind rewind rw
54 52 0:41 / /data/mnt ro - tmpfs rewind-guard ro
61 30 0:43 / /data/mnt2 rw - tmpfs rewind-guard ro
62 30 0:44 / /data/with\\040space rw - tmpfs x rw
";
        let s = stack(mi, Path::new("/data/mnt"));
        let ids: Vec<u64> = s.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![52, 54, 60]);
        assert_eq!(s[2].fstype, "fuse.rewind");
        assert_eq!(stack(mi, Path::new("/data/with space"))[0].id, 62);
        assert!(stack(mi, Path::new("/nowhere")).is_empty());
    }

    #[test]
    fn plan_table() {
        let bind = m(1, 0, "ext4", "/dev/vda");
        let guard = m(2, 1, "tmpfs", GUARD_SOURCE);
        let fuse = m(3, 2, "fuse", FUSE_SOURCE);
        let fuse2 = m(4, 3, "fuse.rewind", FUSE_SOURCE);
        let other = m(5, 2, "tmpfs", "somebody");
        let sshfs = m(6, 1, "fuse.sshfs", "host:/x");
        let ok = |detach, mount_guard| {
            Ok(Plan {
                detach,
                mount_guard,
            })
        };
        let cases: Vec<(&str, Vec<Mounted>, Result<Plan, String>)> = vec![
            ("a plain directory gets the guard", vec![], ok(0, true)),
            (
                "a volume mount is kept and guarded",
                vec![bind.clone()],
                ok(0, true),
            ),
            (
                "a guard from an earlier run is reused",
                vec![bind.clone(), guard.clone()],
                ok(0, false),
            ),
            (
                "a dead FUSE mount on the guard is detached",
                vec![bind.clone(), guard.clone(), fuse.clone()],
                ok(1, false),
            ),
            (
                "two dead FUSE mounts are detached",
                vec![guard.clone(), fuse.clone(), fuse2.clone()],
                ok(2, false),
            ),
            (
                "a dead FUSE mount of a build without the guard",
                vec![bind.clone(), fuse.clone()],
                ok(1, true),
            ),
        ];
        for (what, st, want) in cases {
            assert_eq!(plan(&st), want, "{what}");
        }
        assert!(
            plan(&[bind.clone(), sshfs]).is_ok_and(|p| p.detach == 0),
            "another FUSE filesystem is not ours"
        );
        let refused = plan(&[bind.clone(), guard.clone(), other.clone()]).unwrap_err();
        assert!(refused.contains("tmpfs somebody"), "{refused}");
        assert!(
            plan(&[fuse.clone(), other]).is_err(),
            "a foreign mount over a FUSE mount of ours"
        );
    }
}
