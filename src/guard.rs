//! The mountpoint: what sits at `--mount` under and around Rewind's FUSE
//! mount. It owns reading the stack of mounts at that path, deciding what a
//! start does with the dead FUSE mounts earlier runs left on top (mount
//! over them, so that every copy of them reaches the new mount; detach
//! them past a bound), and the read-only *guard*: a
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
    #[error("cannot tell whether the FUSE mount at {path} is alive: {source}")]
    Check {
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

/// How many dead FUSE mounts of earlier runs a start leaves beneath its own
/// mount before it detaches them instead. Each dead layer holds a little
/// kernel memory (a superblock, its root inode and an aborted connection
/// under /sys/fs/fuse/connections) until the mountpoint's directory goes,
/// which in a pod is when the pod is deleted; a sidecar crashing over and
/// over must not grow that without bound.
pub(crate) const MAX_DEAD_LAYERS: usize = 8;

/// What a start does at the mountpoint before it mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Dead FUSE mounts of earlier runs to detach from the top (only when
    /// more than `MAX_DEAD_LAYERS` of them are stacked).
    pub detach: usize,
    /// Dead FUSE mounts of earlier runs the new mount goes over; they stay
    /// beneath it.
    pub over_dead: usize,
    /// Whether the guard must be mounted (it is not there yet).
    pub mount_guard: bool,
}

/// Decides what to do with the stack of mounts at the mountpoint, bottom
/// first; `top_alive` says whether a Rewind FUSE mount on top still has a
/// daemon behind it (`top_alive` is asked only of a mount the path
/// reaches: the top).
///
/// Rewind's dead FUSE mounts on top are mounted *over*, not detached: a
/// mount on a dead mount reaches every copy of it (its peers, and the
/// slaves a container runtime made when it bound the mount into an
/// application's container), so an application that kept running sees the
/// new mount on its next lookup, where a detach would reach only the path
/// it was made at. Past `MAX_DEAD_LAYERS` they are detached. A guard is
/// kept, or made when the path holds no mount of Rewind's; a live Rewind
/// mount on top is another daemon's and anything else on top of Rewind's
/// mounts is someone else's: both are refused rather than mounted over or
/// detached.
pub(crate) fn plan(stack: &[Mounted], top_alive: bool) -> Result<Plan, String> {
    let dead = stack.iter().rev().take_while(|m| m.is_fuse()).count();
    if dead > 0 && top_alive {
        return Err(
            "another `rewind run` serves this mountpoint (its mount answers); stop it first, or choose another --mount"
                .into(),
        );
    }
    let rest = &stack[..stack.len() - dead];
    let ours = |m: &Mounted| m.is_guard() || m.is_fuse();
    match rest.last() {
        Some(top) if !top.is_guard() && rest.iter().any(ours) => Err(format!(
            "the mountpoint holds a mount of Rewind's under a mount that is not ({}); unmount what is on top before starting",
            rest.iter()
                .map(|m| format!("{} {}", m.fstype, m.source))
                .collect::<Vec<_>>()
                .join(" < ")
        )),
        top => {
            let guarded = top.is_some_and(Mounted::is_guard);
            if dead > MAX_DEAD_LAYERS {
                Ok(Plan {
                    detach: dead,
                    over_dead: 0,
                    mount_guard: !guarded,
                })
            } else {
                Ok(Plan {
                    detach: 0,
                    over_dead: dead,
                    // Over dead layers a guard would have to go on top of
                    // them, a layer more per crash; the dead mount refuses
                    // every access already.
                    mount_guard: !guarded && dead == 0,
                })
            }
        }
    }
}

fn mountinfo() -> Result<String, GuardError> {
    std::fs::read_to_string("/proc/self/mountinfo").map_err(GuardError::MountInfo)
}

/// Whether the FUSE mount the path reaches has a daemon behind it. statfs
/// is never answered from the kernel's caches: a dead mount fails it with
/// ENOTCONN (ECONNABORTED once aborted through /sys/fs/fuse/connections).
fn alive(path: &Path) -> Result<bool, GuardError> {
    match rustix::fs::statfs(path) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOTCONN | rustix::io::Errno::CONNABORTED) => Ok(false),
        Err(e) => Err(GuardError::Check {
            path: path.display().to_string(),
            source: e.into(),
        }),
    }
}

/// Reads the stack at the mountpoint, decides (`plan`) and detaches what
/// the plan says; returns the plan, whose `mount_guard` and `over_dead`
/// the start acts on right before it mounts.
pub(crate) fn prepare(path: &Path) -> Result<Plan, GuardError> {
    let st = stack(&mountinfo()?, path);
    let top_alive = match st.last() {
        Some(top) if top.is_fuse() => alive(path)?,
        _ => false,
    };
    let plan = plan(&st, top_alive).map_err(GuardError::Refused)?;
    if plan.detach > 0 {
        tracing::warn!(
            mount = %path.display(),
            layers = plan.detach,
            "detaching the dead mounts earlier runs left (more than {MAX_DEAD_LAYERS}); an application still holding this path through one of them sees the new mount only after it restarts"
        );
    }
    for _ in 0..plan.detach {
        rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
            GuardError::Detach {
                path: path.display().to_string(),
                source: e.into(),
            }
        })?;
    }
    Ok(plan)
}

/// Mounts the guard at the mountpoint; called right before the FUSE mount,
/// once every check has passed, when `prepare`'s plan asks for it. A guard
/// that cannot be mounted (no CAP_SYS_ADMIN) is logged and protection goes
/// on without it.
pub(crate) fn mount_guard(path: &Path) {
    use rustix::mount::{mount, MountFlags};
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
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
        let plan_of = |detach, over_dead, mount_guard| {
            Ok(Plan {
                detach,
                over_dead,
                mount_guard,
            })
        };
        let layers = |n: usize| {
            let mut st = vec![bind.clone(), guard.clone()];
            st.extend((0..n).map(|_| fuse.clone()));
            st
        };
        let refused = |needle: &str| Err(needle.to_string());
        // (what, stack bottom first, whether the top answers, the plan or a
        // word the refusal must contain)
        let cases: Vec<(&str, Vec<Mounted>, bool, Result<Plan, String>)> = vec![
            ("nothing: a plain directory gets the guard", vec![], false, plan_of(0, 0, true)),
            ("a volume mount is kept and guarded", vec![bind.clone()], false, plan_of(0, 0, true)),
            (
                "guard only: an earlier run's guard is reused",
                vec![bind.clone(), guard.clone()],
                false,
                plan_of(0, 0, false),
            ),
            (
                "guard and a dead FUSE mount: mounted over, not detached",
                layers(1),
                false,
                plan_of(0, 1, false),
            ),
            (
                "several dead layers are mounted over",
                vec![guard.clone(), fuse.clone(), fuse2.clone()],
                false,
                plan_of(0, 2, false),
            ),
            ("as many as the bound allows", layers(MAX_DEAD_LAYERS), false, plan_of(0, MAX_DEAD_LAYERS, false)),
            (
                "past the bound they are all detached down to the guard",
                layers(MAX_DEAD_LAYERS + 1),
                false,
                plan_of(MAX_DEAD_LAYERS + 1, 0, false),
            ),
            (
                "a dead FUSE mount of a build without the guard: mounted over, no guard on top of it",
                vec![bind.clone(), fuse.clone()],
                false,
                plan_of(0, 1, false),
            ),
            (
                "a live Rewind mount is another daemon's",
                layers(1),
                true,
                refused("another `rewind run` serves this mountpoint"),
            ),
            (
                "another FUSE filesystem is not ours and is not asked",
                vec![bind.clone(), sshfs.clone()],
                false,
                plan_of(0, 0, true),
            ),
            (
                "a foreign mount over the guard",
                vec![bind.clone(), guard.clone(), other.clone()],
                false,
                refused("tmpfs somebody"),
            ),
            (
                "a foreign mount over a dead FUSE mount of ours",
                vec![fuse.clone(), other.clone()],
                false,
                refused("tmpfs somebody"),
            ),
            (
                "a dead layer over a foreign mount over ours",
                vec![guard.clone(), fuse.clone(), other.clone(), fuse2.clone()],
                false,
                refused("tmpfs somebody"),
            ),
        ];
        for (what, st, alive, want) in cases {
            match (plan(&st, alive), want) {
                (Err(got), Err(needle)) => assert!(got.contains(&needle), "{what}: {got}"),
                (got, want) => assert_eq!(got, want, "{what}"),
            }
        }
    }
}
