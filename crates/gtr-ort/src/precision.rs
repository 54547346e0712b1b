//! Numeric precisions (`--precision`, the manifest's `precision`): their
//! names. What a precision means for one bundle on one device (graph files,
//! provider switches) is decided by the backend
//! ([`crate::precision_choice`]).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A numeric precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Tf32,
    Fp16,
    Bf16,
    Int8,
}

impl Precision {
    pub const ALL: [Precision; 5] = [
        Precision::Fp32,
        Precision::Tf32,
        Precision::Fp16,
        Precision::Bf16,
        Precision::Int8,
    ];

    /// The precisions that are variant graphs in a bundle.
    pub const VARIANTS: [Precision; 3] = [Precision::Fp16, Precision::Bf16, Precision::Int8];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    /// Whether this precision is a set of variant graphs (not fp32's own
    /// graphs, not a provider switch).
    pub fn is_variant(self) -> bool {
        Precision::VARIANTS.contains(&self)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!("`{s}` is not a precision; use one of fp32, tf32, fp16, bf16, int8")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_list_the_choices() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        let e = "fp8".parse::<Precision>().unwrap_err();
        assert!(e.contains("`fp8`") && e.contains("fp32, tf32, fp16, bf16, int8"));
        assert!("FP16".parse::<Precision>().is_err());
        assert_eq!(
            serde_json::to_value(Precision::Bf16).unwrap(),
            serde_json::json!("bf16")
        );
    }
}
