//! The ranges the front ends hold their numbers to, the command line's
//! flags and Python's arguments alike (README, "Inputs are range-checked").

/// The most images one command makes (`--num-images`; the labels and file
/// names of a run are planned up front).
pub const MAX_IMAGES: usize = 10_000_000;
/// The largest batch (`--batch`).
pub const MAX_BATCH: usize = 4096;
/// The most intra-op threads per graph (`--threads`).
pub const MAX_THREADS: usize = 1024;
/// The most repeats of a comparison (`eval --repeats`).
pub const MAX_REPEATS: usize = 10_000;
