//! The set-group-ID clearing that the kernel's FUSE client leaves to the
//! daemon.
//!
//! Natively, a write, append, truncate or chown by a caller without
//! CAP_FSETID clears S_ISGID from a file that has it without group execute
//! when the caller is not in the file's group (the kernel's
//! `setattr_should_drop_sgid`; with group execute the bit goes whoever the
//! caller is). The FUSE client only clears S_ISGID where group execute is
//! set: it cannot tell the daemon about the caller's groups, and FUSE
//! requests carry only the caller's pid, uid and file-system gid. The
//! daemon writes as root, which would keep the bit, so it decides the other
//! case itself, reading the caller's supplementary groups and capabilities
//! from `/proc/<pid>/status`.

use std::io;

/// The process behind a request, as the FUSE request header names it.
/// Public because `Passthrough`'s public methods take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requester {
    /// The calling thread's id in the daemon's pid namespace; 0 when the
    /// caller lives in a pid namespace the daemon cannot see (an
    /// application container of a pod without a shared process namespace).
    pub pid: u32,
    pub uid: u32,
    /// The caller's file-system gid, which the kernel counts as one of its
    /// groups.
    pub gid: u32,
}

/// What `/proc/<pid>/status` says of a caller's privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Privileges {
    pub(crate) groups: Vec<u32>,
    pub(crate) fsetid: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    #[error("the caller is outside the daemon's pid namespace (pid 0)")]
    NoPid,
    #[error("reading /proc/{pid}/status: {source}")]
    Read { pid: u32, source: io::Error },
    #[error("/proc/{pid}/status has no {field} line")]
    Missing { pid: u32, field: &'static str },
    #[error("/proc/{pid}/status has an unreadable {field} line")]
    Malformed { pid: u32, field: &'static str },
}

/// CAP_FSETID's bit in the capability masks of `/proc/<pid>/status`.
const CAP_FSETID: u32 = 4;

/// The kernel's rule (`setattr_should_drop_sgid`): whether a change that
/// removes privileges (a write, truncate or chown) clears S_ISGID from a
/// file with `mode` and group `file_gid`, made by a caller whose
/// file-system gid is `caller_gid`, with supplementary groups
/// `caller_groups`, holding CAP_FSETID or not. Without group execute the
/// bit stays for a member of the file's group or a holder of CAP_FSETID.
/// For writes and truncates the kernel only asks when the caller lacks
/// CAP_FSETID; chown asks always.
pub(crate) fn should_drop_sgid(
    mode: u32,
    file_gid: u32,
    caller_gid: u32,
    caller_groups: &[u32],
    has_fsetid: bool,
) -> bool {
    if mode & libc::S_ISGID == 0 {
        return false;
    }
    if mode & libc::S_IXGRP != 0 {
        return true;
    }
    let member = caller_gid == file_gid || caller_groups.contains(&file_gid);
    !(member || has_fsetid)
}

/// Reads the supplementary groups and whether CAP_FSETID is effective from
/// the text of `/proc/<pid>/status`.
pub(crate) fn parse_status(pid: u32, text: &str) -> Result<Privileges, StatusError> {
    let field = |name: &'static str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or(StatusError::Missing { pid, field: name })
    };
    let groups = field("Groups")?
        .split_ascii_whitespace()
        .map(|g| g.parse::<u32>())
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| StatusError::Malformed {
            pid,
            field: "Groups",
        })?;
    let cap_eff =
        u64::from_str_radix(field("CapEff")?, 16).map_err(|_| StatusError::Malformed {
            pid,
            field: "CapEff",
        })?;
    Ok(Privileges {
        groups,
        fsetid: cap_eff & (1 << CAP_FSETID) != 0,
    })
}

impl Requester {
    /// The caller's groups and CAP_FSETID, from `/proc/<pid>/status` (the
    /// pid names the calling thread, whose credentials these are; the
    /// thread is inside the system call, so the entry exists while the
    /// request is served).
    pub(crate) fn read_privileges(&self) -> Result<Privileges, StatusError> {
        if self.pid == 0 {
            return Err(StatusError::NoPid);
        }
        let pid = self.pid;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|source| StatusError::Read { pid, source })?;
        parse_status(pid, &text)
    }

    /// The caller's privileges, or a stand-in when they cannot be read. The
    /// stand-in is the conservative choice for the set-group-ID bit: the
    /// caller is in no supplementary group (only a file-system gid equal to
    /// the file's proves membership), so the bit is cleared unless the
    /// caller is shown to be entitled to it, as the kernel does for a caller
    /// it cannot place in the group. CAP_FSETID is assumed for uid 0 only,
    /// since root in a container holds it by default, so root's truncates
    /// and chowns keep the bit as they do natively.
    fn privileges(&self) -> Privileges {
        self.read_privileges().unwrap_or_else(|e| {
            tracing::debug!("set-group-ID decision without the caller's groups: {e}");
            Privileges {
                groups: Vec::new(),
                fsetid: self.uid == 0,
            }
        })
    }

    /// Whether a change that removes privileges, made by this caller,
    /// clears S_ISGID from a file with `mode` and group `file_gid`.
    /// `fsetid` is what the kernel said of the caller's CAP_FSETID (a write
    /// flagged FUSE_WRITE_KILL_SUIDGID comes from a caller without it), or
    /// None when the request does not say (truncate, chown), which then
    /// reads the caller's capabilities.
    pub(crate) fn kills_sgid(&self, mode: u32, file_gid: u32, fsetid: Option<bool>) -> bool {
        // Only a caller outside the file's group by its file-system gid,
        // changing a set-group-ID file without group execute, needs /proc:
        // every other case follows from the mode and the request, and this
        // one is rare, so writes do not pay a read of /proc each.
        let undecided = mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID
            && file_gid != self.gid
            && fsetid != Some(true);
        if !undecided {
            // Here CAP_FSETID either was stated by the kernel or cannot
            // change the answer, so the stand-in `true` is never consulted
            // wrongly.
            return should_drop_sgid(mode, file_gid, self.gid, &[], fsetid.unwrap_or(true));
        }
        let p = self.privileges();
        should_drop_sgid(
            mode,
            file_gid,
            self.gid,
            &p.groups,
            fsetid.unwrap_or(p.fsetid),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_drop_sgid_follows_the_kernels_rule() {
        const G: u32 = 2000;
        // (mode, file gid, caller gid, groups, CAP_FSETID, dropped)
        let table: &[(u32, u32, u32, &[u32], bool, bool)] = &[
            // No set-group-ID: nothing to drop, whoever asks.
            (0o0664, G, 1235, &[], false, false),
            (0o4755, G, 1235, &[], false, false),
            // Group-executable: dropped for everyone, CAP_FSETID or not.
            (0o2775, G, G, &[], false, true),
            (0o2710, G, 0, &[], true, true),
            (0o6755, G, 1235, &[G], true, true),
            // Without group execute: kept for a member by its gid...
            (0o2664, G, G, &[], false, false),
            // ... or by a supplementary group only,
            (0o2664, G, 65534, &[1234, G], false, false),
            // ... and for a holder of CAP_FSETID outside the group;
            (0o2664, G, 0, &[], true, false),
            // dropped for a non-member without it.
            (0o2664, G, 1235, &[], false, true),
            (0o2600, G, 65534, &[1234], false, true),
            (0o6644, G, 1234, &[1234, 65534], false, true),
        ];
        for &(mode, file_gid, gid, groups, fsetid, want) in table {
            assert_eq!(
                should_drop_sgid(mode, file_gid, gid, groups, fsetid),
                want,
                "mode {mode:#o} file gid {file_gid} caller gid {gid} groups {groups:?} \
                 CAP_FSETID {fsetid}"
            );
        }
    }

    const STATUS: &str = "Name:\tpython3\nUmask:\t0077\nState:\tR (running)\n\
        Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
        Groups:\t1234 2000 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn parse_status_reads_groups_and_cap_fsetid() {
        let p = parse_status(7, STATUS).unwrap();
        assert_eq!(
            p,
            Privileges {
                groups: vec![1234, 2000],
                fsetid: false
            }
        );
        let root = STATUS
            .replace("Groups:\t1234 2000 ", "Groups:\t")
            .replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff");
        assert_eq!(
            parse_status(7, &root).unwrap(),
            Privileges {
                groups: vec![],
                fsetid: true
            }
        );
        // Every capability but CAP_FSETID (bit 4).
        let no_fsetid = STATUS.replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffef");
        assert!(!parse_status(7, &no_fsetid).unwrap().fsetid);
    }

    #[test]
    fn parse_status_refuses_what_it_cannot_read() {
        let no_groups = STATUS.replace("Groups:", "Grupos:");
        assert!(matches!(
            parse_status(7, &no_groups),
            Err(StatusError::Missing {
                field: "Groups",
                ..
            })
        ));
        let bad_cap = STATUS.replace("CapEff:\t0000000000000000", "CapEff:\tzz");
        assert!(matches!(
            parse_status(7, &bad_cap),
            Err(StatusError::Malformed {
                field: "CapEff",
                ..
            })
        ));
    }

    #[test]
    fn the_daemons_own_status_reads() {
        let me = Requester {
            pid: std::process::id(),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        };
        me.read_privileges().unwrap();
        let nobody = Requester { pid: 0, ..me };
        assert!(matches!(nobody.read_privileges(), Err(StatusError::NoPid)));
    }

    #[test]
    fn unreadable_privileges_clear_the_bit_for_a_non_root_non_member() {
        // pid 0: the caller is in a pid namespace the daemon cannot see.
        let user = Requester {
            pid: 0,
            uid: 1235,
            gid: 1235,
        };
        assert!(user.kills_sgid(0o102664, 2000, None));
        assert!(!user.kills_sgid(0o102664, 1235, None));
        let root = Requester {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        assert!(!root.kills_sgid(0o102664, 2000, None));
        // A write flagged FUSE_WRITE_KILL_SUIDGID: the kernel says no CAP_FSETID.
        assert!(root.kills_sgid(0o102664, 2000, Some(false)));
    }
}
