//! Renderings of a plan for people and programs: text tables
//! ([`text`]), JSON ([`json`]), a picture of the order ([`png`]) and
//! regression snapshots of a folder of schedules ([`snapshot`]).

pub mod json;
pub mod png;
pub mod snapshot;
pub mod text;

/// A one-character label for stage `index`: A–Z, then a–z, then 0–9.
pub fn stage_label(index: usize) -> char {
    const LABELS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    LABELS.get(index).map_or('?', |&b| b as char)
}
