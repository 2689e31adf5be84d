//! Rewind: continuous data protection for a directory.
//!
//! See docs/ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod base;
pub(crate) mod catalog;
pub mod cli;
pub mod clock;
pub(crate) mod codec;
pub(crate) mod compact;
pub mod crypt;
pub mod delta;
pub mod diff;
pub mod fetch;
pub(crate) mod fs;
pub mod gap;
pub mod guard;
pub mod http;
pub mod journal;
pub mod layout;
pub mod metrics;
pub(crate) mod outage;
pub mod progress;
pub mod prune;
pub mod record;
pub(crate) mod redo;
pub(crate) mod replay;
pub mod restore;
pub mod retention;
pub mod run;
pub mod segment;
pub(crate) mod ship;
pub mod store;
pub mod timeline;
pub mod verify;
pub mod view;
pub mod webhook;
