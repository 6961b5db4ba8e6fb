//! Diagnostics: a user's mistake as data, with file:line:col, the repository and a hint.
//!
//! The compiler never stops at the first mistake: every pass pushes into a [`Diagnostics`]
//! list and carries on with what it could understand. Rendering (with the offending source
//! line) lives here too, so every front end prints the same thing.

use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable kebab-case identifier, e.g. `unknown-key`, `needs-unknown`, `cycle`.
    pub code: &'static str,
    /// Repository the file belongs to (absent for the master config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// File as shown to the user.
    pub file: String,
    /// 1-based line; 0 when the position is unknown.
    pub line: u32,
    /// 1-based column; 0 when the position is unknown.
    pub col: u32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `error[code]: message`, the place, the source line with a caret, and the hint.
    pub fn render(&self, source: Option<&str>) -> String {
        let mut out = String::new();
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{level}[{}]: {}", self.code, self.message);
        let repo = self.repo.as_deref().map(|r| format!(" (repository {r})")).unwrap_or_default();
        if self.line > 0 {
            let _ = writeln!(out, "  --> {}:{}:{}{repo}", self.file, self.line, self.col);
        } else {
            let _ = writeln!(out, "  --> {}{repo}", self.file);
        }
        let line_text = match (source, self.line) {
            (Some(s), line) if line > 0 => s.lines().nth(line as usize - 1),
            _ => None,
        };
        if let Some(text) = line_text {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            let shown: String = text.chars().take(160).collect();
            let caret_at = (self.col.max(1) as usize - 1).min(shown.chars().count());
            let caret_pad: String = shown.chars().take(caret_at).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
            let _ = writeln!(out, " {pad} |");
            let _ = writeln!(out, " {num} | {shown}");
            let _ = writeln!(out, " {pad} | {caret_pad}^");
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "  = hint: {hint}");
        }
        out
    }
}

/// What a snippet that ran printed, and where the snippet is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Printed {
    pub repo: String,
    pub file: String,
    pub line: u32,
    pub col: u32,
    /// Which snippet, e.g. "`matrix:` of builder `test`".
    pub what: String,
    pub text: String,
}

impl Printed {
    /// `note: ...printed:` and the output, indented.
    pub fn render(&self) -> String {
        let mut out = format!(
            "note: the snippet of {} printed:\n  --> {}:{}:{} (repository {})\n",
            self.what, self.file, self.line, self.col, self.repo
        );
        for line in self.text.trim_end_matches('\n').lines() {
            let _ = writeln!(out, "   | {line}");
        }
        out
    }
}

/// Diagnostics of one compile, in the order found, and what snippets printed.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
    printed: Vec<Printed>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }

    pub fn push_printed(&mut self, p: Printed) {
        self.printed.push(p);
    }

    /// What snippets printed, sorted by file and position.
    pub fn take_printed(&mut self) -> Vec<Printed> {
        let mut printed = std::mem::take(&mut self.printed);
        printed.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        printed
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
        self.printed.extend(other.printed);
    }

    /// Sorted by file, line, column, then message: the order a user reads them in.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by(|a, b| (&a.file, a.line, a.col, &a.message).cmp(&(&b.file, b.line, b.col, &b.message)));
        self.items.dedup();
        self.items
    }
}

/// Up to three names from `candidates` close to `wanted`, best first.
pub fn suggest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut scored: Vec<(f64, &str)> = candidates
        .into_iter()
        .map(|c| {
            // Jaro-Winkler for longer names; a small edit distance for short ones (`rn`).
            let jw = strsim::jaro_winkler(wanted, c);
            let close = strsim::levenshtein(wanted, c) <= (wanted.len().max(c.len()) / 3).max(1);
            (if close { jw.max(0.8) } else { jw }, c)
        })
        .filter(|(score, _)| *score >= 0.8)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    scored.into_iter().take(3).map(|(_, c)| c).collect()
}

/// "did you mean `x`?" or "did you mean `x` or `y`?", if anything is close.
pub fn did_you_mean<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let close = suggest(wanted, candidates);
    match close.as_slice() {
        [] => None,
        [one] => Some(format!("did you mean `{one}`?")),
        many => {
            Some(format!("did you mean {}?", many.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(" or ")))
        }
    }
}

/// A list of names for a message, cut after `max` with a count of the rest.
pub fn name_list<S: AsRef<str>>(names: &[S], max: usize) -> String {
    let mut shown: Vec<&str> = names.iter().take(max).map(AsRef::as_ref).collect();
    if shown.is_empty() {
        return "(none)".to_owned();
    }
    let mut text = shown.join(", ");
    if names.len() > max {
        shown.clear();
        let _ = write!(text, ", and {} more", names.len() - max);
    }
    text
}
