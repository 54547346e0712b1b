//! Compiler-style diagnostics for schedule files: a message, a span in the
//! source, and an optional hint, rendered with file, line, column and caret.

use std::fmt;
use std::sync::Arc;

/// A number as a person would write it in a message (`24`, `2.5`,
/// `1e300`).
pub fn fmt_num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_finite() && v != 0.0 && !(1e-6..1e15).contains(&v.abs()) {
        // Far from 1, the exponent form: `1e300`, not 301 digits.
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// A byte range `[start, end)` in a schedule's source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    /// The smallest span covering both `self` and `other`.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// A schedule's text and the name it was read from (a path, or `<string>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub text: String,
}

impl Source {
    /// A source named `name` holding `text`, less a byte-order mark at its
    /// start (some editors write one; it is not part of the schedule).
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Arc<Source> {
        Arc::new(Source {
            name: name.into(),
            text: super::text::without_bom(text.into()),
        })
    }

    /// The folder the schedule's relative paths are read from: that of the
    /// file it was read from; `None` (the current directory) for standard
    /// input, strings and names without a folder.
    pub fn folder(&self) -> Option<&std::path::Path> {
        std::path::Path::new(&self.name)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
    }

    /// 1-based line and column (in characters) of byte offset `pos`.
    pub fn line_col(&self, pos: usize) -> (usize, usize) {
        super::text::line_col(&self.text, pos)
    }

    /// The text of 1-based line `line`, without its line end (LF or CRLF;
    /// a lone CR before it stays, to be shown).
    pub fn line_text(&self, line: usize) -> &str {
        let text = self
            .text
            .split_inclusive('\n')
            .nth(line.saturating_sub(1))
            .unwrap_or("");
        text.strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text)
    }
}

/// One error found in a schedule: what is wrong (`message`), where (`span`),
/// and, when we can tell, what would be right (`help`).
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub source: Arc<Source>,
    pub span: Span,
    pub message: String,
    pub help: Option<String>,
    /// Context from outside the file (the parameter values `--set` gave).
    pub note: Option<String>,
}

impl Diagnostic {
    pub fn new(source: &Arc<Source>, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            source: Arc::clone(source),
            span,
            message: message.into(),
            help: None,
            note: None,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// With a note listing `set` (name, value), the parameters given from
    /// outside the file, when there are any: an error the file's text does
    /// not show may come from them.
    pub fn with_set_params<'a>(self, set: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        let set: Vec<String> = set
            .into_iter()
            .map(|(name, v)| format!("{name} = {}", fmt_num(v)))
            .collect();
        if set.is_empty() {
            return self;
        }
        self.with_note(format!(
            "parameters given from outside the file (--set): {}",
            set.join(", ")
        ))
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// 1-based line and column of the start of the span.
    pub fn line_col(&self) -> (usize, usize) {
        self.source.line_col(self.span.start)
    }
}

impl fmt::Display for Diagnostic {
    /// Renders as
    /// ```text
    /// error: <message>
    ///  --> file:line:col
    ///   |
    /// 3 | stage a { tokens S4 }
    ///   |                  ^^
    ///   = help: <help>
    /// ```
    /// with the line shown as an excerpt shows it (escaped and cut).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (line, col) = self.line_col();
        let text = self.source.line_text(line);
        let gutter = line.to_string().len();
        let pad = " ".repeat(gutter);
        writeln!(f, "error: {}", self.message)?;
        writeln!(
            f,
            "{pad}--> {}:{line}:{col}",
            terminal_safe(&self.source.name)
        )?;
        writeln!(f, "{pad} |")?;
        // Caret under the span, clipped to the first line it covers.
        let (end_line, end_col) = self.source.line_col(self.span.end);
        let to = if end_line == line && end_col > col {
            end_col - 1
        } else {
            usize::MAX
        };
        let excerpt = Excerpt::new(text, col - 1, to);
        writeln!(f, "{line} | {}", excerpt.text)?;
        write!(f, "{pad} | {}{}", excerpt.lead, "^".repeat(excerpt.width))?;
        if let Some(help) = &self.help {
            write!(f, "\n{pad} = help: {help}")?;
        }
        if let Some(note) = &self.note {
            write!(f, "\n{pad} = note: {note}")?;
        }
        Ok(())
    }
}

/// Refuses a lone CR ([`super::text::lone_carriage_return`]) in `text`: the schedule's
/// own (`order_file` `None`: the error points at the CR), or that of the
/// order file named `order_file.0` (the error names its line and column and
/// points at the `order file` clause, `order_file.1`).
pub(crate) fn refuse_lone_carriage_return(
    src: &Arc<Source>,
    text: &str,
    order_file: Option<(&str, Span)>,
) -> Result<(), Diagnostic> {
    let Some(at) = super::text::lone_carriage_return(text) else {
        return Ok(());
    };
    let message = "a carriage return (CR) that no line feed follows: lines end with LF or CRLF";
    let help = "save the file with LF (Unix) or CRLF (Windows) line ends; a lone CR (old Mac line end) would hide the rest of a `#` comment's line";
    let diag = match order_file {
        None => Diagnostic::new(src, Span::new(at, at + 1), message),
        Some((path, span)) => {
            let (line, col) = super::text::line_col(text, at);
            Diagnostic::new(
                src,
                span,
                format!("order file `{path}`, line {line}, column {col}: {message}"),
            )
        }
    };
    Err(diag.with_help(help))
}

/// The most characters of a source line an error shows: a longer line is
/// cut to a window around the error, each cut marked `…`.
const MAX_EXCERPT_CHARS: usize = 120;
/// How many of those may come before the error's first character.
const EXCERPT_BEFORE: usize = 40;

/// A source line as an error shows it, and the caret's place under it.
///
/// Contract: control characters other than tab, and invisible formatting
/// characters ([`is_invisible`]), are shown escaped (ESC as `\u{1b}`, CR as
/// `\r`), so that no byte of the file can move or restyle a terminal; the
/// shown line is at most [`MAX_EXCERPT_CHARS`] characters (plus `…` marks);
/// `lead` (spaces, and tabs where the line has them) puts the caret under
/// the error's first character, and `width` carets (at least 1) cover the
/// error's characters as shown, up to the window's end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Excerpt {
    text: String,
    lead: String,
    width: usize,
}

impl Excerpt {
    /// The excerpt of `line` for an error over its characters `[from, to)`
    /// (0-based character indices, clamped to the line).
    fn new(line: &str, from: usize, to: usize) -> Excerpt {
        let chars: Vec<char> = line.chars().collect();
        let from = from.min(chars.len());
        let to = to.clamp(from, chars.len());
        let shown_width = |c: char| shown(c).chars().count();
        // The window [lo, hi): up to EXCERPT_BEFORE characters before the
        // error, then as many after it as fit, then more before if the
        // line ended first.
        let (mut lo, mut hi, mut used) = (from, from, 0);
        while lo > 0 && used + shown_width(chars[lo - 1]) <= EXCERPT_BEFORE {
            lo -= 1;
            used += shown_width(chars[lo]);
        }
        while hi < chars.len() && (hi == from || used + shown_width(chars[hi]) <= MAX_EXCERPT_CHARS)
        {
            used += shown_width(chars[hi]);
            hi += 1;
        }
        while lo > 0 && used + shown_width(chars[lo - 1]) <= MAX_EXCERPT_CHARS {
            lo -= 1;
            used += shown_width(chars[lo]);
        }
        let (cut_before, cut_after) = (lo > 0, hi < chars.len());
        let mut text: String = if cut_before {
            "…".into()
        } else {
            String::new()
        };
        text.extend(chars[lo..hi].iter().map(|&c| shown(c)));
        if cut_after {
            text.push('…');
        }
        let mut lead: String = if cut_before {
            " ".into()
        } else {
            String::new()
        };
        for &c in &chars[lo..from] {
            match c {
                '\t' => lead.push('\t'),
                c => lead.extend(std::iter::repeat_n(' ', shown_width(c))),
            }
        }
        let width = chars[from..to.min(hi)]
            .iter()
            .map(|&c| shown_width(c))
            .sum();
        Excerpt {
            text,
            lead,
            width: usize::max(width, 1),
        }
    }
}

/// Whether `c` is an invisible formatting character: zero-width ones, the
/// byte-order mark, and the bidirectional controls that can make a line
/// read differently from what it holds.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// Whether `c` cannot be seen as written: a control character, or one
/// that [`is_invisible`].
fn unseen(c: char) -> bool {
    c.is_control() || is_invisible(c)
}

/// `c` escaped (ESC as `\u{1b}`, CR as `\r`) when `escape`, else as written.
fn escaped_if(c: char, escape: bool) -> String {
    if escape {
        c.escape_default().to_string()
    } else {
        c.to_string()
    }
}

/// `c` as an excerpt shows it: escaped when it is [`unseen`] and not a tab
/// (tabs align the caret).
fn shown(c: char) -> String {
    escaped_if(c, c != '\t' && unseen(c))
}

/// `text` as it may be written to a terminal: every character that
/// cannot be seen (control characters, invisible formatting
/// ones) escaped as Rust writes it (ESC as `\u{1b}`), except line feeds
/// and tabs, which lay the text out. Nothing else changes: no byte of a
/// file name or of a file's text that a message repeats can move or
/// restyle the terminal it is printed on.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let escape = |c: char| c != '\n' && c != '\t' && unseen(c);
    if !text.chars().any(escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| escaped_if(c, escape(c)))
        .collect::<String>()
        .into()
}

/// The most characters of file text (a word, a path) that a message quotes.
const MAX_QUOTED_CHARS: usize = 40;

/// File text (a word, a path) as a message quotes it: each character that
/// cannot be seen (as [`shown`] escapes it, and also tabs and whitespace
/// other than the space) escaped, and, when that is longer than
/// [`MAX_QUOTED_CHARS`] characters, cut in the middle to its first and last
/// halves of that joined by `…` (a path keeps its file name).
pub(crate) fn quoted(text: &str) -> String {
    let parts: Vec<String> = text
        .chars()
        .map(|c| escaped_if(c, c != ' ' && (unseen(c) || c.is_whitespace())))
        .collect();
    let width = |p: &String| p.chars().count();
    if parts.iter().map(width).sum::<usize>() <= MAX_QUOTED_CHARS {
        return parts.concat();
    }
    let half = MAX_QUOTED_CHARS / 2;
    let fits = |used: &mut usize, p: &String| {
        *used += width(p);
        *used <= half
    };
    let mut used = 0;
    let head: String = parts
        .iter()
        .take_while(|p| fits(&mut used, p))
        .cloned()
        .collect();
    used = 0;
    let mut tail: Vec<&String> = parts
        .iter()
        .rev()
        .take_while(|p| fits(&mut used, p))
        .collect();
    tail.reverse();
    format!("{head}…{}", tail.into_iter().cloned().collect::<String>())
}

impl std::error::Error for Diagnostic {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_safe_escapes_all_but_layout() {
        assert!(matches!(
            terminal_safe("a\tb\nc é"),
            std::borrow::Cow::Borrowed("a\tb\nc é")
        ));
        assert_eq!(
            terminal_safe("x\u{1b}[2J\r\u{7}\u{202e}y\n"),
            "x\\u{1b}[2J\\r\\u{7}\\u{202e}y\n"
        );
        let d = Diagnostic::new(
            &Source::new("a\u{1b}[31m.gtr", "stage a"),
            Span { start: 0, end: 5 },
            "m",
        );
        assert!(d.to_string().contains(" --> a\\u{1b}[31m.gtr:1:1"), "{d}");
    }

    /// The excerpt line and caret line of `d`, without the gutter.
    fn excerpt_lines(d: &Diagnostic) -> (String, String) {
        let text = d.to_string();
        let lines: Vec<&str> = text.lines().collect();
        let strip = |l: &str| l.split_once(" | ").map_or("", |(_, r)| r).to_string();
        (strip(lines[3]), strip(lines[4]))
    }

    /// The caret's first column (in characters) under the excerpt.
    fn caret_at(caret: &str) -> usize {
        caret.chars().take_while(|&c| c != '^').count()
    }

    #[test]
    fn control_characters_are_escaped_with_the_caret_aligned() {
        let text = "stage a { tokens all\u{1b}[31m\u{c} steps 0 }";
        let src = Source::new("t.gtr", text);
        let at = text.find('0').unwrap();
        let d = Diagnostic::new(&src, Span::new(at, at + 1), "bad");
        let (line, caret) = excerpt_lines(&d);
        assert_eq!(line, "stage a { tokens all\\u{1b}[31m\\u{c} steps 0 }");
        assert!(!d.to_string().contains(['\u{1b}', '\u{c}']));
        assert_eq!(caret_at(&caret), line.find('0').unwrap());
        assert_eq!(caret.trim(), "^");
        // A caret over an escaped character covers all of it.
        let esc = text.find('\u{1b}').unwrap();
        let (line, caret) = excerpt_lines(&Diagnostic::new(&src, Span::new(esc, esc + 1), "x"));
        assert_eq!(caret_at(&caret), line.find('\\').unwrap());
        assert_eq!(caret.trim(), "^^^^^^");
        // Tabs stay tabs (they align the caret); bidi controls are escaped.
        let src = Source::new("t.gtr", "\tx \u{202e}y z");
        let (line, caret) = excerpt_lines(&Diagnostic::new(&src, Span::new(6, 7), "x"));
        assert_eq!(line, "\tx \\u{202e}y z");
        assert_eq!(caret, "\t          ^");
    }

    #[test]
    fn long_lines_are_cut_around_the_error() {
        let text = format!("{}oops{}", "a".repeat(100_000), " b".repeat(100_000));
        let src = Source::new("t.gtr", text.as_str());
        let d = Diagnostic::new(&src, Span::new(100_000, 100_004), "bad");
        let (line, caret) = excerpt_lines(&d);
        assert!(d.to_string().len() < 400, "{}", d.to_string().len());
        assert!(line.starts_with('…') && line.ends_with('…'), "{line}");
        assert!(line.chars().count() <= MAX_EXCERPT_CHARS + 2, "{line}");
        let at = line.find("oops").unwrap();
        assert_eq!(caret_at(&caret), line[..at].chars().count());
        assert_eq!(caret.trim(), "^^^^");
        // Near the start: no mark before; at the end: no mark after.
        let d = Diagnostic::new(&src, Span::new(3, 4), "bad");
        let (line, caret) = excerpt_lines(&d);
        assert!(line.starts_with("aaaa") && line.ends_with('…'), "{line}");
        assert_eq!(caret, "   ^");
        let end = text.len();
        let (line, caret) = excerpt_lines(&Diagnostic::new(&src, Span::new(end, end), "x"));
        assert!(line.starts_with('…') && line.ends_with(" b"), "{line}");
        assert_eq!(caret_at(&caret), line.chars().count());
        // A span running past the window is cut with it.
        let (line, caret) = excerpt_lines(&Diagnostic::new(&src, Span::new(0, end), "x"));
        assert_eq!(caret.len(), line.chars().count() - 1);
    }

    #[test]
    fn short_lines_are_shown_whole() {
        let src = Source::new("t.gtr", "grid 4x4\nstage a { tokens S4 }\n");
        let d = Diagnostic::new(&src, Span::new(26, 28), "unknown");
        assert_eq!(
            d.to_string(),
            "error: unknown\n --> t.gtr:2:18\n  |\n2 | stage a { tokens S4 }\n  |                  ^^"
        );
    }
}
