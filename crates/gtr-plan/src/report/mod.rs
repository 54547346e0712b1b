//! Renderings of a plan for people and programs: text tables
//! ([`text`]), JSON ([`json`]) and a picture of the order ([`png`]).
//! Regression snapshots of a folder of schedules, which write files, are
//! the `gtr-run` crate's (`gtr_run::snapshot`).

pub mod json;
pub mod png;
pub mod text;

/// A one-character label for stage `index`: A–Z, then a–z, then 0–9, then
/// `+` for every later stage (not `?`, which marks adaptive tokens in the
/// reveal grid).
pub fn stage_label(index: usize) -> char {
    const LABELS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    LABELS.get(index).map_or('+', |&b| b as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages past A–Z, a–z, 0–9 are `+`, never the `?` of adaptive tokens.
    #[test]
    fn stage_labels() {
        let labels: String = (0..64).map(stage_label).collect();
        assert_eq!(
            labels,
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789++"
        );
    }
}
