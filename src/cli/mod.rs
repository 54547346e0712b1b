//! The subcommands of the `gtr-run` command line, one room each, and what
//! they share: the runtime options (`runtime`), the exit status (`status`)
//! and writing to standard output.

pub mod compare;
pub mod generate;
pub mod plan;
pub mod runtime;
pub mod status;

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
