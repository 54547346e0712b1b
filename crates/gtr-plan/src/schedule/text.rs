//! Small text files (schedules, order files) read with a size limit and
//! a UTF-8 check that names the place of a bad byte.

/// The largest schedule file read (the presets are under 3 KB), and the
/// largest order file.
pub const MAX_SCHEDULE_BYTES: u64 = 1 << 20;

/// Why [`read_small_text`] gave no text.
#[derive(Debug)]
pub enum SmallTextError {
    Io(std::io::Error),
    /// Too large, or not UTF-8 (with the place).
    Text(String),
}

/// Reads the small text file at `path` ([`read_small_text`]), refusing a
/// pipe or socket before it is opened (opening a pipe waits for a writer,
/// forever).
pub fn read_small_text_file(path: &std::path::Path, what: &str) -> Result<String, SmallTextError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::metadata(path)
            .is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        {
            return Err(SmallTextError::Text(format!(
                "a pipe or socket, not a file; {what} is read from a regular file"
            )));
        }
    }
    std::fs::File::open(path)
        .map_err(SmallTextError::Io)
        .and_then(|f| read_small_text(f, what))
}

/// Why `bytes` bytes of `what` ("a schedule") are too many, if they are
/// more than [`MAX_SCHEDULE_BYTES`].
pub fn too_large(bytes: usize, what: &str) -> Option<String> {
    (bytes as u64 > MAX_SCHEDULE_BYTES).then(|| {
        format!(
            "larger than {} KiB; {what} is a small text file",
            MAX_SCHEDULE_BYTES / 1024
        )
    })
}

/// Reads at most [`MAX_SCHEDULE_BYTES`] of UTF-8 text through a bounded
/// reader (one byte past the limit tells it was exceeded). `what` names the
/// kind of file in the size message ("a schedule").
pub fn read_small_text(reader: impl std::io::Read, what: &str) -> Result<String, SmallTextError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader
        .take(MAX_SCHEDULE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(SmallTextError::Io)?;
    if let Some(problem) = too_large(bytes.len(), what) {
        return Err(SmallTextError::Text(problem));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        SmallTextError::Text(format!(
            "not UTF-8 text (line {line}, byte {col} of the line)"
        ))
    })?;
    Ok(without_bom(text))
}

/// The byte offset of the first carriage return of `text` that no line
/// feed follows (a "lone CR", classic Mac OS's line end). Schedules and
/// order files end lines with LF or CRLF only: a lone CR is refused, since
/// read as a space it would hide the rest of a `#` comment's line, and
/// read as a line end it would make lines disagree with other tools'.
pub(crate) fn lone_carriage_return(text: &str) -> Option<usize> {
    text.match_indices('\r')
        .map(|(at, _)| at)
        .find(|&at| !text[at + 1..].starts_with('\n'))
}

/// 1-based line and column (in characters) of byte offset `pos` of `text`.
pub(crate) fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let mut pos = pos.min(text.len());
    while !text.is_char_boundary(pos) {
        pos -= 1;
    }
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..pos].chars().count() + 1;
    (line, col)
}

/// `text` less a byte-order mark at its start (some editors write one; it
/// is not part of the text).
pub(crate) fn without_bom(text: String) -> String {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let text = read_small_text(&b"\xef\xbb\xbfgrid 4x4\n"[..], "a schedule").unwrap();
        assert_eq!(text, "grid 4x4\n");
        let bad = read_small_text(&b"ok\n\xff"[..], "a schedule");
        assert!(matches!(bad, Err(SmallTextError::Text(m)) if m.contains("line 2")));
    }

    #[test]
    fn lone_carriage_returns_are_found() {
        assert_eq!(lone_carriage_return("a\r\nb\r\n"), None);
        assert_eq!(lone_carriage_return("a\r\nb\rc"), Some(4));
        assert_eq!(lone_carriage_return("a\r\r\n"), Some(1));
        assert_eq!(lone_carriage_return("ab\r"), Some(2));
    }
}
