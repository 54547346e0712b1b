//! The subcommands of the `gtr-run` command line, one room each, and what
//! they share: the runtime options (`runtime`), the exit status (`status`)
//! and writing to the terminal.
//!
//! What a person reads (messages on stderr, tables and summaries on
//! stdout) goes out through [`say!`] and [`write_stdout`], which show the
//! characters a terminal would act on escaped
//! ([`gtr_run::schedule::terminal_safe`]): file names and schedule text
//! that messages repeat are the user's data. Machine-readable output
//! (`plan --json`) goes through [`write_stdout_raw`].

pub mod compare;
pub mod generate;
pub mod plan;
pub mod runtime;
pub mod status;

/// `eprintln!` for messages a person reads: the line is written as
/// [`gtr_run::schedule::terminal_safe`] shows it.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("{}", gtr_run::schedule::terminal_safe(&format!($($arg)*)))
    };
}
pub(crate) use say;

/// Writes `text`, meant to be read by a person, to stdout as
/// [`gtr_run::schedule::terminal_safe`] shows it; a reader that went away
/// (`| head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    write_stdout_raw(&gtr_run::schedule::terminal_safe(text))
}

/// Writes `text` to stdout as it is (JSON, which escapes what it holds);
/// a reader that went away (`| head`) is not an error.
pub fn write_stdout_raw(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
