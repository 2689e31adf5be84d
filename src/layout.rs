//! Names Rewind reserves on the protected volume and in a restore target.
//! It owns the directory name that the mount hides and restore keeps for
//! itself, so that the passthrough core, the base walk and restore agree on
//! it without depending on each other. It must not do I/O.

/// The directory at the root of the source (and of a restore target) that
/// holds Rewind's own files: the journal by default, the local state, and a
/// restore's incomplete-marker. The mount hides it, the base walk skips it,
/// and restore refuses a record that names it.
pub const HIDDEN: &str = ".rewind";
