//! `rewind verify`: reads every object of a volume and checks it — each
//! segment, delta, manifest and chunk against its blake3 trailer and its key
//! (and, in an encrypted volume, its authentication tag; there every marker
//! is opened too, since the timeline reads markers from listings alone), and
//! the timeline for continuity (no missing sequence numbers, a base per
//! lineage, every chunk a manifest names present, every base kept by a
//! prune complete with its records). Objects that a prune condemned are
//! gone as far as verify is concerned. It reports every
//! problem it finds rather than stopping at the first. It must not modify
//! the store.

use std::collections::{HashMap, HashSet};

use crate::base::{chunk_key, decode_chunk, load_manifest};
use crate::crypt::ChunkNaming;
use crate::progress::{Meter, Unit};
use crate::store::{Store, StoreError};
use crate::timeline::{lineage_id, Timeline};
use crate::{delta, segment};

#[derive(Debug, Default)]
pub struct Report {
    pub segments: usize,
    pub deltas: usize,
    pub bases: usize,
    pub chunks: usize,
    pub records: u64,
    pub problems: Vec<String>,
}

/// Verifies without a meter.
pub fn verify(store: &dyn Store, progress: &mut dyn FnMut(&str)) -> Result<Report, StoreError> {
    verify_with(store, &Meter::silent(), progress)
}

/// Verifies, counting each kind of object into `meter` as a phase
/// (segments, deltas and bases by count, chunks by bytes).
pub fn verify_with(
    store: &dyn Store,
    meter: &Meter,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, StoreError> {
    let t = Timeline::load(store)?;
    let mut rep = Report::default();
    meter.begin("segments", Unit::Objects, t.segments.len() as u64);
    for s in &t.segments {
        let key = s.key();
        match store
            .get(&key)
            .map_err(|e| e.to_string())
            .and_then(|d| segment::decode(&d).map_err(|e| e.to_string()))
        {
            Ok((meta, recs)) if meta == *s => rep.records += recs.len() as u64,
            Ok(_) => rep
                .problems
                .push(format!("segment {key}: header does not match the key")),
            Err(e) => rep.problems.push(format!("segment {key}: {e}")),
        }
        rep.segments += 1;
        meter.add(1);
        if rep.segments % 500 == 0 {
            progress(&format!(
                "checked {} of {} segments",
                rep.segments,
                t.segments.len()
            ));
        }
    }
    meter.begin("deltas", Unit::Objects, t.deltas.len() as u64);
    for d in &t.deltas {
        let key = d.key();
        match store
            .get(&key)
            .map_err(|e| e.to_string())
            .and_then(|b| delta::decode(&b).map_err(|e| e.to_string()))
        {
            Ok(got) if got.meta == *d => {}
            Ok(_) => rep
                .problems
                .push(format!("delta {key}: header does not match the key")),
            Err(e) => rep.problems.push(format!("delta {key}: {e}")),
        }
        rep.deltas += 1;
        meter.add(1);
    }
    // Chunk lengths come from the manifests, so the chunks phase can count
    // bytes against a known total.
    let mut chunks_needed = HashMap::new();
    meter.begin("bases", Unit::Objects, t.bases.len() as u64);
    for b in &t.bases {
        match load_manifest(store, b) {
            Ok(m) => {
                for o in &m.objects {
                    for e in &o.extents {
                        chunks_needed.insert(e.hash, u64::from(e.len));
                    }
                }
            }
            Err(e) => rep.problems.push(format!("base {}: {e}", b.key())),
        }
        rep.bases += 1;
        meter.add(1);
    }
    meter.begin("chunks", Unit::Bytes, chunks_needed.values().sum());
    let naming = store.chunk_naming()?;
    for (h, len) in &chunks_needed {
        let key = chunk_key(h);
        match store.get(&key) {
            Ok(d) => {
                if let Err(e) = decode_chunk(&d, h, &naming) {
                    rep.problems.push(format!("chunk {key}: {e}"));
                }
            }
            Err(StoreError::NotFound { .. }) => rep
                .problems
                .push(format!("chunk {key} is missing but a base needs it")),
            // An encrypted chunk that fails its tag is a finding like a
            // plaintext chunk that fails its hash.
            Err(e @ StoreError::Sealed { .. }) => rep.problems.push(format!("chunk {key}: {e}")),
            Err(e) => return Err(e),
        }
        rep.chunks += 1;
        meter.add(*len);
    }
    meter.end();
    if naming != ChunkNaming::Plain {
        check_markers(store, &mut rep)?;
    }
    for (b, why) in t.unusable_bases() {
        rep.problems
            .push(format!("base {} cannot be restored: {why}", b.key()));
    }
    for g in t.gaps() {
        if !g.declared && g.reason.contains("missing") {
            rep.problems
                .push(format!("lineage {}: {}", g.lineage, g.reason));
        }
    }
    let with_base: HashSet<u64> = t.bases.iter().map(|b| b.lineage).collect();
    let lineages: HashSet<u64> = t.segments.iter().map(|s| s.lineage).collect();
    for l in lineages.difference(&with_base) {
        rep.problems.push(format!(
            "lineage {} has segments but no base",
            lineage_id(*l)
        ));
    }
    for k in &t.unknown {
        rep.problems
            .push(format!("unexpected object {k} (not a Rewind object name)"));
    }
    Ok(rep)
}

/// In an encrypted volume every marker is sealed too, and the timeline reads
/// markers from listings alone: open each one so that a replaced or damaged
/// marker is reported (one GET per marker).
fn check_markers(store: &dyn Store, rep: &mut Report) -> Result<(), StoreError> {
    const CHECKED: [&str; 4] = ["seg/", "delta/", "base/", "chunk/"];
    for key in crate::timeline::list_volume(store)? {
        if CHECKED.iter().any(|k| key.starts_with(k)) {
            continue;
        }
        match store.get(&key) {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e @ StoreError::Sealed { .. }) => rep.problems.push(format!("marker {key}: {e}")),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
