//! Rewind: continuous data protection for a directory.
//!
//! See docs/ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod cli;
pub mod http;
pub mod metrics;
pub mod store;
pub mod base;
pub mod clock;
pub mod codec;
pub mod journal;
pub mod record;
pub mod segment;
pub mod timeline;
pub mod restore;
pub mod redo;
pub mod fs;
pub mod ship;
pub mod run;
pub mod verify;
pub mod webhook;
