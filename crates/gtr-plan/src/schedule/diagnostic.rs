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
        let pos = floor_char_boundary(&self.text, pos.min(self.text.len()));
        let before = &self.text[..pos];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..pos].chars().count() + 1;
        (line, col)
    }

    /// The text of 1-based line `line`, without its newline.
    pub fn line_text(&self, line: usize) -> &str {
        self.text
            .split('\n')
            .nth(line.saturating_sub(1))
            .unwrap_or("")
            .trim_end_matches('\r')
    }
}

fn floor_char_boundary(s: &str, mut pos: usize) -> usize {
    while pos > 0 && !s.is_char_boundary(pos) {
        pos -= 1;
    }
    pos
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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (line, col) = self.line_col();
        let text = self.source.line_text(line);
        let gutter = line.to_string().len();
        let pad = " ".repeat(gutter);
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "{pad}--> {}:{line}:{col}", self.source.name)?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{line} | {text}")?;
        // Caret under the span, clipped to the first line it covers.
        let (end_line, end_col) = self.source.line_col(self.span.end);
        let line_chars = text.chars().count();
        let width = if end_line == line && end_col > col {
            end_col - col
        } else {
            line_chars.saturating_sub(col - 1).max(1)
        };
        let lead: String = text
            .chars()
            .take(col - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad} | {lead}{}", "^".repeat(width.max(1)))?;
        if let Some(help) = &self.help {
            write!(f, "\n{pad} = help: {help}")?;
        }
        if let Some(note) = &self.note {
            write!(f, "\n{pad} = note: {note}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}
