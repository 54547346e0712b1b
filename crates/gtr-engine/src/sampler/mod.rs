//! The per-token diffusion sampler: MAR's respaced DDPM chains
//! ([`chain`]) and GtR's frequency-weighted token selection ([`fts`]).

pub mod chain;
pub mod fts;

pub use chain::{Chain, ChainCache, NoiseSchedule, Variance};
pub use fts::FtsScorer;
