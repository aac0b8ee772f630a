//! The env file (`.service_env`): `KEY=VALUE` lines read as start.sh's `source` would
//! have set them, without a shell.

use super::*;

/// Parses `KEY=VALUE` lines as start.sh's `source` would have set them, without a shell:
/// `#` comments and blank lines are skipped, an `export ` prefix is allowed, a value in
/// matching single or double quotes loses them. Nothing is expanded. A control character
/// other than TAB (a NUL, an escape, a carriage return inside a line) is refused: no value
/// can carry it to Apptainer's environment, and a terminal would be told to act on it.
/// Errors name the line.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    Ok(parse_env_file_lines(text)?
        .into_iter()
        .map(|(_, k, v)| (k, v))
        .collect())
}

/// One variable of the env file: its line, name and value.
pub type EnvLine = (usize, String, String);

/// [`parse_env_file`], with the line of each variable, for messages about one of them.
pub fn parse_env_file_lines(text: &str) -> Result<Vec<EnvLine>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        if let Some(c) = raw.chars().find(|&c| c.is_control() && c != '\t') {
            return Err((
                lineno,
                format!(
                    "contains the control character U+{:04X}; the env file holds text only (TAB is the one allowed)",
                    c as u32
                ),
            ));
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((k, v)) = line.split_once('=') else {
            return Err((lineno, format!("{line:?} is not KEY=VALUE")));
        };
        check_env_name(k).map_err(|e| (lineno, e))?;
        let v = unquote(v).ok_or_else(|| (lineno, format!("unbalanced quotes in {v:?}")))?;
        if v.contains("$(") || v.contains('`') {
            return Err((
                lineno,
                format!("{k}: command substitution is not supported (the file is read, not run by a shell)"),
            ));
        }
        out.push((lineno, k.to_owned(), v));
    }
    Ok(out)
}

pub(super) fn unquote(v: &str) -> Option<String> {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q) {
            return rest.strip_suffix(q).map(str::to_owned);
        }
    }
    if v.ends_with('"') || v.ends_with('\'') {
        return None;
    }
    Some(v.to_owned())
}
