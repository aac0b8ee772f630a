//! Where a service file is wrong: issues located as `file:line:col: key` with the
//! offending line and a caret, collected into one [`ConfigError`].

use super::*;

/// One problem in a service file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub reason: String,
    pub hint: Option<String>,
    /// The offending source line with a caret under the column.
    pub snippet: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read service file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_issues(path, issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

pub(super) fn render_issues(path: &Path, issues: &[Issue]) -> String {
    let mut out = String::new();
    for (i, issue) in issues.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}:{}:{}: {}: {}",
            path.display(),
            issue.line,
            issue.column,
            issue.key,
            issue.reason
        ));
        if !issue.snippet.is_empty() {
            out.push('\n');
            out.push_str(&issue.snippet);
        }
        if let Some(hint) = &issue.hint {
            out.push_str(&format!("\n  hint: {hint}"));
        }
    }
    out
}

impl ConfigError {
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid { issues, .. } => issues,
            ConfigError::Read { .. } => &[],
        }
    }
}

// ---------------------------------------------------------------------------------------
// The file as serde sees it

/// The key a toml error is about. For "missing field `x`" the span is the enclosing
/// table (or the whole file), so the key is that table's plus the field.
pub(super) fn error_key(text: &str, offset: usize, message: &str) -> String {
    let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
    else {
        return key_at(text, offset);
    };
    let line = text[offset.min(text.len())..]
        .lines()
        .next()
        .unwrap_or("")
        .trim_start();
    if line.starts_with('[') {
        format!("{}.{field}", key_at(text, offset))
    } else {
        field.to_owned()
    }
}

/// `   | line` and `   |   ^` under the column, like toml's own errors.
pub(super) fn snippet(text: &str, offset: usize) -> String {
    let (line, col) = line_col(text, offset);
    let Some(src) = text.lines().nth(line - 1) else {
        return String::new();
    };
    format!("{line:>4} | {src}\n     | {}^", " ".repeat(col - 1))
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key at a byte offset: the `key =` on that line, inside the nearest
/// `[table]` or `[[table]]` header above it. Used to name the key in toml's own errors,
/// which carry a span but not always the key.
pub(super) fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = if line.starts_with('[') {
        return line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned();
    } else {
        line.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
            .to_owned()
    };
    match (table, key.is_empty()) {
        (_, true) => "(file)".into(),
        (Some(t), false) => format!("{t}.{key}"),
        (None, false) => key,
    }
}
