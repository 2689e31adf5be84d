//! The on-disk layout Rewind owns outside the store: the `.rewind`
//! directory at the root of the source (and of a restore target), the
//! markers in it, the fixed names in the journal directory, and the local
//! state file with its format version. Every such path and every byte of
//! the state file is decided here, so that the passthrough core, the base
//! walk, restore and the daemon agree on them without depending on each
//! other. It reads and writes the state file and nothing else; it must not
//! decide what a state means (that is `run::decide`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::timeline::{BadLineageId, LineageId};

/// The directory at the root of the source (and of a restore target) that
/// holds Rewind's own files: the journal by default, the local state, and a
/// restore's incomplete-marker. The mount hides it, the base walk skips it,
/// and restore refuses a record that names it.
pub const HIDDEN: &str = ".rewind";

/// The file in `HIDDEN` that says a restore into this directory has not
/// finished; restore writes it first and removes it last.
pub const INCOMPLETE_MARKER: &str = "restore-incomplete";

/// `<root>/.rewind/restore-incomplete`.
pub(crate) fn incomplete_marker(root: &Path) -> PathBuf {
    root.join(HIDDEN).join(INCOMPLETE_MARKER)
}

/// The journal directory when `--journal-dir` is not given.
pub(crate) fn default_journal_dir(source: &Path) -> PathBuf {
    source.join(HIDDEN).join("journal")
}

/// The file a running daemon holds an exclusive lock on, so that two
/// daemons never share one journal.
pub(crate) fn journal_lock(journal_dir: &Path) -> PathBuf {
    journal_dir.join("lock")
}

/// The local state file, in the journal directory.
pub(crate) fn state_file(journal_dir: &Path) -> PathBuf {
    journal_dir.join("state.json")
}

/// The state file version this build writes. Version 1 had no `version`
/// field; it is read forever. A newer version is refused.
pub const STATE_VERSION: u32 = 2;

/// What the journal directory remembers between runs of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalState {
    pub volume: String,
    pub lineage: LineageId,
    /// The machine's boot id when the state was written; a different boot
    /// id at the next start means the machine restarted.
    pub boot_id: String,
    /// True only after a shutdown that stored everything and synced the
    /// source.
    pub clean: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("it is state format version {0}, newer than this build reads (1..={STATE_VERSION}); run the rewind that wrote it or a newer one")]
    Newer(u32),
    #[error("it is not a state file ({0}); move it away to start a new lineage with a full base")]
    Malformed(String),
    #[error("its lineage: {0}")]
    Lineage(#[from] BadLineageId),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

// Format (version 2), JSON:
//   {"version": 2, "volume": "<volume>", "lineage": "<16 hex>",
//    "boot_id": "<boot id>", "clean": <bool>}
// Version 1 is the same without "version".
#[derive(Serialize, Deserialize)]
struct StateJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    volume: String,
    lineage: String,
    boot_id: String,
    clean: bool,
}

/// Only the version, read first so that a newer file whose fields changed
/// is refused for its version, not for a missing field.
#[derive(Deserialize)]
struct VersionOnly {
    #[serde(default)]
    version: Option<u32>,
}

pub fn encode_state(st: &LocalState) -> Vec<u8> {
    serde_json::to_vec_pretty(&StateJson {
        version: Some(STATE_VERSION),
        volume: st.volume.clone(),
        lineage: st.lineage.to_string(),
        boot_id: st.boot_id.clone(),
        clean: st.clean,
    })
    .expect("a state always serializes")
}

pub fn decode_state(bytes: &[u8]) -> Result<LocalState, StateError> {
    let v: VersionOnly =
        serde_json::from_slice(bytes).map_err(|e| StateError::Malformed(e.to_string()))?;
    match v.version.unwrap_or(1) {
        1 | 2 => {}
        n => return Err(StateError::Newer(n)),
    }
    let j: StateJson =
        serde_json::from_slice(bytes).map_err(|e| StateError::Malformed(e.to_string()))?;
    Ok(LocalState {
        volume: j.volume,
        lineage: j.lineage.parse()?,
        boot_id: j.boot_id,
        clean: j.clean,
    })
}

/// The state in `journal_dir`, or None before the first run.
pub(crate) fn read_state(journal_dir: &Path) -> Result<Option<LocalState>, StateError> {
    match std::fs::read(state_file(journal_dir)) {
        Ok(b) => decode_state(&b).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the state in `journal_dir` atomically and durably: a crash
/// leaves the old state or the new one, never a torn file.
pub(crate) fn write_state(journal_dir: &Path, st: &LocalState) -> std::io::Result<()> {
    let tmp = journal_dir.join("state.json.tmp");
    std::fs::write(&tmp, encode_state(st))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, state_file(journal_dir))?;
    std::fs::File::open(journal_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_decode_by_version() {
        let want = LocalState {
            volume: "db".into(),
            lineage: LineageId(0x1234),
            boot_id: "b1".into(),
            clean: true,
        };
        let ok = |text: &str| decode_state(text.as_bytes()).unwrap();
        let err = |text: &str| decode_state(text.as_bytes()).unwrap_err().to_string();
        // Version 1 had no version field.
        assert_eq!(
            ok(r#"{"volume":"db","lineage":"0000000000001234","boot_id":"b1","clean":true}"#),
            want
        );
        assert_eq!(
            ok(
                r#"{"version":2,"volume":"db","lineage":"0000000000001234","boot_id":"b1","clean":true}"#
            ),
            want
        );
        assert_eq!(decode_state(&encode_state(&want)).unwrap(), want);
        assert!(err(r#"{"version":3,"other":1}"#).contains("state format version 3, newer"));
        assert!(err("{").contains("not a state file"));
        assert!(
            err(r#"{"volume":"db","lineage":"xyz","boot_id":"b1","clean":true}"#)
                .contains("not a lineage id")
        );
    }
}
