//! A small tokenizer for the seed's `start.sh`: enough of bash's word syntax to read the
//! script, never to run it.
//!
//! It splits the text into simple commands (at newlines, `;`, `&&`, `||`, `|`, `&`) of
//! words, joins `\`-newline continuations, drops `#` comments, and keeps each word as parts:
//! literal text, `$VAR`/`${VAR}` expansions and `$(…)`/`` `…` `` substitutions, each marked
//! quoted or not (an unquoted expansion is what bash word-splits, bash(1) "Word Splitting").
//! Control keywords (`if`, `then`, `fi` …) come out as ordinary words; `interpret` in
//! `mod.rs` gives them their meaning. What it cannot read (an unterminated quote, a
//! here-document, a subshell) is an error naming the line.

/// One piece of a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    /// `$NAME`, `${NAME}`, `$0`; `${…}` with an operator keeps its whole text as the name.
    Var {
        name: String,
        quoted: bool,
    },
    /// The text inside `$(…)` or backquotes.
    Subst {
        text: String,
        quoted: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub parts: Vec<Part>,
    /// 1-based line where the word starts.
    pub line: usize,
}

impl Word {
    /// The word when it is plain text (no expansion at all).
    pub fn literal(&self) -> Option<String> {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                _ => return None,
            }
        }
        Some(s)
    }

    /// The word as it was written, near enough for messages.
    pub fn source(&self) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Var { name, quoted } => {
                    s.push_str(&format!(
                        "{q}${{{name}}}{q}",
                        q = if *quoted { "\"" } else { "" }
                    ));
                }
                Part::Subst { text, quoted } => {
                    s.push_str(&format!(
                        "{q}$({text}){q}",
                        q = if *quoted { "\"" } else { "" }
                    ));
                }
            }
        }
        s
    }
}

/// A simple command: its words, and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub words: Vec<Word>,
    pub line: usize,
}

/// What could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub reason: String,
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    commands: Vec<Command>,
    words: Vec<Word>,
    parts: Vec<Part>,
    lit: String,
    /// A word has begun (even an empty one: `""`).
    in_word: bool,
    word_line: usize,
}

/// Splits a script into simple commands.
pub fn parse(text: &str) -> Result<Vec<Command>, SyntaxError> {
    let mut lx = Lexer {
        chars: text.chars().peekable(),
        line: 1,
        commands: Vec::new(),
        words: Vec::new(),
        parts: Vec::new(),
        lit: String::new(),
        in_word: false,
        word_line: 1,
    };
    lx.run()?;
    Ok(lx.commands)
}

impl Lexer<'_> {
    fn err<T>(&self, line: usize, reason: impl Into<String>) -> Result<T, SyntaxError> {
        Err(SyntaxError {
            line,
            reason: reason.into(),
        })
    }

    fn start_word(&mut self) {
        if !self.in_word {
            self.in_word = true;
            self.word_line = self.line;
        }
    }

    fn flush_lit(&mut self) {
        if !self.lit.is_empty() {
            self.parts.push(Part::Lit(std::mem::take(&mut self.lit)));
        }
    }

    fn end_word(&mut self) {
        self.flush_lit();
        if self.in_word {
            let parts = std::mem::take(&mut self.parts);
            self.words.push(Word {
                parts,
                line: self.word_line,
            });
            self.in_word = false;
        }
    }

    fn end_command(&mut self) {
        self.end_word();
        if !self.words.is_empty() {
            let words = std::mem::take(&mut self.words);
            let line = words[0].line;
            self.commands.push(Command { words, line });
        }
    }

    fn run(&mut self) -> Result<(), SyntaxError> {
        while let Some(c) = self.chars.next() {
            match c {
                '\\' => match self.chars.next() {
                    Some('\n') => self.line += 1, // continuation
                    Some(n) => {
                        self.start_word();
                        self.lit.push(n);
                    }
                    None => {}
                },
                '\n' => {
                    self.end_command();
                    self.line += 1;
                }
                ' ' | '\t' | '\r' => self.end_word(),
                ';' | '|' => {
                    self.chars.next_if_eq(&c);
                    self.end_command();
                }
                '&' => {
                    self.chars.next_if_eq(&'&');
                    self.end_command();
                }
                '#' if !self.in_word => while self.chars.next_if(|&n| n != '\n').is_some() {},
                '<' if self.chars.peek() == Some(&'<') => {
                    return self.err(self.line, "here-documents (<<) are not supported");
                }
                '(' | ')' => {
                    return self.err(
                        self.line,
                        format!("{c:?} outside $(…): subshells and functions are not supported"),
                    );
                }
                '\'' => {
                    self.start_word();
                    let start = self.line;
                    loop {
                        match self.chars.next() {
                            Some('\'') => break,
                            Some(n) => {
                                if n == '\n' {
                                    self.line += 1;
                                }
                                self.lit.push(n);
                            }
                            None => return self.err(start, "unterminated single quote"),
                        }
                    }
                }
                '"' => {
                    self.start_word();
                    self.double_quoted()?;
                }
                '$' => {
                    self.start_word();
                    self.dollar(false)?;
                }
                '`' => {
                    self.start_word();
                    let text = self.backquoted()?;
                    self.flush_lit();
                    self.parts.push(Part::Subst {
                        text,
                        quoted: false,
                    });
                }
                other => {
                    self.start_word();
                    self.lit.push(other);
                }
            }
        }
        self.end_command();
        Ok(())
    }

    fn double_quoted(&mut self) -> Result<(), SyntaxError> {
        let start = self.line;
        loop {
            match self.chars.next() {
                Some('"') => return Ok(()),
                Some('\\') => match self.chars.next() {
                    // bash(1) QUOTING: inside "…" a backslash escapes only these.
                    Some(n @ ('$' | '`' | '"' | '\\')) => self.lit.push(n),
                    Some('\n') => self.line += 1,
                    Some(n) => {
                        self.lit.push('\\');
                        self.lit.push(n);
                    }
                    None => return self.err(start, "unterminated double quote"),
                },
                Some('$') => self.dollar(true)?,
                Some('`') => {
                    let text = self.backquoted()?;
                    self.flush_lit();
                    self.parts.push(Part::Subst { text, quoted: true });
                }
                Some(n) => {
                    if n == '\n' {
                        self.line += 1;
                    }
                    self.lit.push(n);
                }
                None => return self.err(start, "unterminated double quote"),
            }
        }
    }

    fn backquoted(&mut self) -> Result<String, SyntaxError> {
        let start = self.line;
        let mut text = String::new();
        loop {
            match self.chars.next() {
                Some('`') => return Ok(text),
                Some(n) => {
                    if n == '\n' {
                        self.line += 1;
                    }
                    text.push(n);
                }
                None => return self.err(start, "unterminated backquote"),
            }
        }
    }

    /// After a `$`: a variable, `${…}`, `$(…)`, or a literal dollar.
    fn dollar(&mut self, quoted: bool) -> Result<(), SyntaxError> {
        let start = self.line;
        match self.chars.peek().copied() {
            Some('{') => {
                self.chars.next();
                let mut name = String::new();
                loop {
                    match self.chars.next() {
                        Some('}') => break,
                        Some('\n') | None => return self.err(start, "unterminated ${"),
                        Some(n) => name.push(n),
                    }
                }
                self.flush_lit();
                self.parts.push(Part::Var { name, quoted });
            }
            Some('(') => {
                self.chars.next();
                if self.chars.peek() == Some(&'(') {
                    return self.err(start, "arithmetic $((…)) is not supported");
                }
                let mut depth = 1;
                let mut text = String::new();
                loop {
                    match self.chars.next() {
                        Some('(') => {
                            depth += 1;
                            text.push('(');
                        }
                        Some(')') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                            text.push(')');
                        }
                        Some(n) => {
                            if n == '\n' {
                                self.line += 1;
                            }
                            text.push(n);
                        }
                        None => return self.err(start, "unterminated $("),
                    }
                }
                self.flush_lit();
                self.parts.push(Part::Subst { text, quoted });
            }
            Some(c) if c.is_ascii_digit() || matches!(c, '@' | '*' | '#' | '?' | '$' | '!') => {
                self.chars.next();
                self.flush_lit();
                self.parts.push(Part::Var {
                    name: c.to_string(),
                    quoted,
                });
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let mut name = String::new();
                while let Some(n) = self
                    .chars
                    .next_if(|n| n.is_ascii_alphanumeric() || *n == '_')
                {
                    name.push(n);
                }
                self.flush_lit();
                self.parts.push(Part::Var { name, quoted });
            }
            _ => self.lit.push('$'),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Part {
        Part::Lit(s.into())
    }
    fn var(n: &str, quoted: bool) -> Part {
        Part::Var {
            name: n.into(),
            quoted,
        }
    }

    #[test]
    fn continuations_join_one_command_and_lines_are_kept() {
        let c = parse(
            "#!/bin/bash\n\napptainer instance start \\\n  --boot \\\n  -B /a x y\necho hi\n",
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].line, 3);
        let w: Vec<_> = c[0].words.iter().map(|w| w.literal().unwrap()).collect();
        assert_eq!(
            w,
            [
                "apptainer",
                "instance",
                "start",
                "--boot",
                "-B",
                "/a",
                "x",
                "y"
            ]
        );
        assert_eq!(c[0].words[4].line, 5);
        assert_eq!(c[1].line, 6);
    }

    #[test]
    fn quotes_and_expansions_become_parts() {
        let c = parse(r#"x "$DIRNAME/c.sif" $DIRNAME/root:/root ${A}b 'q $x' "a\"b""#).unwrap();
        let w = &c[0].words;
        assert_eq!(w[1].parts, [var("DIRNAME", true), lit("/c.sif")]);
        assert_eq!(w[2].parts, [var("DIRNAME", false), lit("/root:/root")]);
        assert_eq!(w[3].parts, [var("A", false), lit("b")]);
        assert_eq!(w[4].parts, [lit("q $x")]);
        assert_eq!(w[5].parts, [lit("a\"b")]);
    }

    #[test]
    fn command_substitution_keeps_its_text() {
        let c = parse("DIRNAME=$(dirname \"$SCRIPT\")/../").unwrap();
        assert_eq!(
            c[0].words[0].parts,
            [
                lit("DIRNAME="),
                Part::Subst {
                    text: "dirname \"$SCRIPT\"".into(),
                    quoted: false
                },
                lit("/../")
            ]
        );
    }

    #[test]
    fn separators_and_comments() {
        let c = parse("if [ -f x ]; then source x # note\nfi").unwrap();
        let first: Vec<_> = c.iter().map(|c| c.words[0].literal().unwrap()).collect();
        assert_eq!(first, ["if", "then", "fi"]);
        assert_eq!(c[1].words.len(), 3);
    }

    #[test]
    fn unterminated_quote_names_its_line() {
        let e = parse("a\nb \"oops\nc\n").unwrap_err();
        assert_eq!(
            e,
            SyntaxError {
                line: 2,
                reason: "unterminated double quote".into()
            }
        );
        assert_eq!(parse("cat <<EOF\n").unwrap_err().line, 1);
        assert_eq!(parse("\n(cd /)\n").unwrap_err().line, 2);
    }
}
