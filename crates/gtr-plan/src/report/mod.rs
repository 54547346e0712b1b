//! Renderings of a plan for people and programs: text tables
//! ([`text`]), JSON ([`json`]) and a picture of the order ([`png`]).
//! Regression snapshots of a folder of schedules, which write files, are
//! the `gtr-run` crate's (`gtr_run::snapshot`).

pub mod json;
pub mod png;
pub mod text;

/// A one-character label for stage `index`: A–Z, then a–z, then 0–9.
pub fn stage_label(index: usize) -> char {
    const LABELS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    LABELS.get(index).map_or('?', |&b| b as char)
}
