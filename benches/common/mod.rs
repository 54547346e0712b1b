//! Command-line pieces the benches share (each bench is its own binary
//! and includes this module).

/// The arguments cargo gave the bench, without the `--bench` it adds.
pub fn bench_args() -> impl Iterator<Item = String> {
    std::env::args().skip(1).filter(|a| a != "--bench")
}

/// Says what is wrong with `bench`'s command line, with its `usage`, and
/// exits with status 2.
pub fn refuse(bench: &str, problem: &str, usage: &str) -> ! {
    eprintln!("{bench}: {problem}; usage: {usage}");
    std::process::exit(2);
}

/// A flag's value as a whole number above 0, else `None`.
pub fn count(value: Option<String>) -> Option<usize> {
    value
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
}
