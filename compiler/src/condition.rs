//! The `if:` condition language of steps.
//!
//! Small on purpose: string values and booleans, `==`, `!=`, `&&`, `||`, `!`, parentheses,
//! and the functions `startsWith`, `endsWith`, `contains`, `success()`, `failure()`.
//! Names: `branch`, `event`, `repo`, `builder`, `matrix.<axis>`, `props.<name>`.
//! The compiler parses every condition (so a typo fails at compile time, with a column);
//! the master evaluates the parsed form against a build.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Str(String),
    Bool(bool),
    Var(String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Eq(Box<Expr>, Box<Expr>),
    Ne(Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    StartsWith,
    EndsWith,
    Contains,
    Success,
    Failure,
}

/// A parse failure at a 0-based character offset into the condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub offset: usize,
    pub message: String,
}

const VARS: [&str; 4] = ["branch", "event", "repo", "builder"];

/// What a condition is evaluated against.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub vars: BTreeMap<String, String>,
    /// Whether every earlier step of the build succeeded.
    pub so_far_ok: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    EqEq,
    NotEq,
    AndAnd,
    OrOr,
    Bang,
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ConditionError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let two = |a: char, b: char| c == a && chars.get(i + 1) == Some(&b);
        let tok = if c.is_whitespace() {
            i += 1;
            continue;
        } else if c == '(' {
            i += 1;
            Tok::LParen
        } else if c == ')' {
            i += 1;
            Tok::RParen
        } else if c == ',' {
            i += 1;
            Tok::Comma
        } else if two('=', '=') {
            i += 2;
            Tok::EqEq
        } else if two('!', '=') {
            i += 2;
            Tok::NotEq
        } else if two('&', '&') {
            i += 2;
            Tok::AndAnd
        } else if two('|', '|') {
            i += 2;
            Tok::OrOr
        } else if c == '!' {
            i += 1;
            Tok::Bang
        } else if c == '\'' || c == '"' {
            let quote = c;
            i += 1;
            let mut s = String::new();
            loop {
                match chars.get(i) {
                    None => {
                        return Err(ConditionError { offset: start, message: "string is not closed".into() });
                    }
                    Some(&ch) if ch == quote => {
                        i += 1;
                        break;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        i += 1;
                    }
                }
            }
            Tok::Str(s)
        } else if c.is_alphanumeric() || c == '_' {
            let mut s = String::new();
            while let Some(&ch) = chars.get(i) {
                if ch.is_alphanumeric() || ch == '_' || ch == '.' || ch == '-' {
                    s.push(ch);
                    i += 1;
                } else {
                    break;
                }
            }
            Tok::Ident(s)
        } else if c == '=' {
            return Err(ConditionError { offset: start, message: "use `==` to compare".into() });
        } else {
            return Err(ConditionError { offset: start, message: format!("unexpected `{c}`") });
        };
        out.push((start, tok));
    }
    Ok(out)
}

struct P {
    toks: Vec<(usize, Tok)>,
    at: usize,
    end: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|(_, t)| t)
    }
    fn offset(&self) -> usize {
        self.toks.get(self.at).map(|(o, _)| *o).unwrap_or(self.end)
    }
    fn err<T>(&self, message: impl Into<String>) -> Result<T, ConditionError> {
        Err(ConditionError { offset: self.offset(), message: message.into() })
    }
    fn or(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::OrOr) {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.not()?;
        while self.peek() == Some(&Tok::AndAnd) {
            self.at += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }
    fn not(&mut self) -> Result<Expr, ConditionError> {
        if self.peek() == Some(&Tok::Bang) {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, ConditionError> {
        let left = self.atom()?;
        match self.peek() {
            Some(Tok::EqEq) => {
                self.at += 1;
                Ok(Expr::Eq(Box::new(left), Box::new(self.atom()?)))
            }
            Some(Tok::NotEq) => {
                self.at += 1;
                Ok(Expr::Ne(Box::new(left), Box::new(self.atom()?)))
            }
            _ => Ok(left),
        }
    }
    fn atom(&mut self) -> Result<Expr, ConditionError> {
        let Some(tok) = self.peek().cloned() else {
            return self.err("expected a value, found the end of the condition");
        };
        match tok {
            Tok::Str(s) => {
                self.at += 1;
                Ok(Expr::Str(s))
            }
            Tok::LParen => {
                self.at += 1;
                let e = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return self.err("expected `)`");
                }
                self.at += 1;
                Ok(e)
            }
            Tok::Ident(name) => {
                let ident_at = self.offset();
                self.at += 1;
                if self.peek() == Some(&Tok::LParen) {
                    self.at += 1;
                    let (func, arity) = match name.as_str() {
                        "startsWith" => (Func::StartsWith, 2),
                        "endsWith" => (Func::EndsWith, 2),
                        "contains" => (Func::Contains, 2),
                        "success" => (Func::Success, 0),
                        "failure" => (Func::Failure, 0),
                        _ => {
                            return Err(ConditionError {
                                offset: ident_at,
                                message: format!(
                                    "unknown function `{name}` (known: startsWith, endsWith, contains, success, failure)"
                                ),
                            });
                        }
                    };
                    let mut args = Vec::new();
                    if self.peek() != Some(&Tok::RParen) {
                        args.push(self.or()?);
                        while self.peek() == Some(&Tok::Comma) {
                            self.at += 1;
                            args.push(self.or()?);
                        }
                    }
                    if self.peek() != Some(&Tok::RParen) {
                        return self.err("expected `)` or `,`");
                    }
                    self.at += 1;
                    if args.len() != arity {
                        return Err(ConditionError {
                            offset: ident_at,
                            message: format!("`{name}` takes {arity} argument(s), got {}", args.len()),
                        });
                    }
                    return Ok(Expr::Call(func, args));
                }
                match name.as_str() {
                    "true" => Ok(Expr::Bool(true)),
                    "false" => Ok(Expr::Bool(false)),
                    n if VARS.contains(&n) || n.starts_with("matrix.") || n.starts_with("props.") => {
                        Ok(Expr::Var(name))
                    }
                    _ => Err(ConditionError {
                        offset: ident_at,
                        message: format!(
                            "unknown name `{name}` (known: branch, event, repo, builder, matrix.<axis>, props.<name>; quote text as 'text')"
                        ),
                    }),
                }
            }
            other => self.err(format!("unexpected {}", describe(&other))),
        }
    }
}

fn describe(t: &Tok) -> &'static str {
    match t {
        Tok::RParen => "`)`",
        Tok::Comma => "`,`",
        Tok::EqEq => "`==`",
        Tok::NotEq => "`!=`",
        Tok::AndAnd => "`&&`",
        Tok::OrOr => "`||`",
        _ => "token",
    }
}

/// Parses a condition.
pub fn parse(src: &str) -> Result<Expr, ConditionError> {
    let toks = lex(src)?;
    let mut p = P { toks, at: 0, end: src.chars().count() };
    let e = p.or()?;
    if p.at < p.toks.len() {
        return p.err("expected `&&`, `||` or the end of the condition");
    }
    Ok(e)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Str(String),
    Bool(bool),
}

impl Val {
    fn truthy(&self) -> bool {
        match self {
            Val::Bool(b) => *b,
            Val::Str(s) => !s.is_empty(),
        }
    }
    fn text(&self) -> String {
        match self {
            Val::Bool(b) => b.to_string(),
            Val::Str(s) => s.clone(),
        }
    }
}

impl Expr {
    /// Evaluates against `scope`; an unset name is the empty string.
    pub fn eval(&self, scope: &Scope) -> bool {
        self.value(scope).truthy()
    }

    fn value(&self, scope: &Scope) -> Val {
        match self {
            Expr::Str(s) => Val::Str(s.clone()),
            Expr::Bool(b) => Val::Bool(*b),
            Expr::Var(name) => Val::Str(scope.vars.get(name).cloned().unwrap_or_default()),
            Expr::Not(e) => Val::Bool(!e.eval(scope)),
            Expr::And(a, b) => Val::Bool(a.eval(scope) && b.eval(scope)),
            Expr::Or(a, b) => Val::Bool(a.eval(scope) || b.eval(scope)),
            Expr::Eq(a, b) => Val::Bool(a.value(scope).text() == b.value(scope).text()),
            Expr::Ne(a, b) => Val::Bool(a.value(scope).text() != b.value(scope).text()),
            Expr::Call(f, args) => {
                let text = |i: usize| args.get(i).map(|a| a.value(scope).text()).unwrap_or_default();
                Val::Bool(match f {
                    Func::StartsWith => text(0).starts_with(&text(1)),
                    Func::EndsWith => text(0).ends_with(&text(1)),
                    Func::Contains => text(0).contains(&text(1)),
                    Func::Success => scope.so_far_ok,
                    Func::Failure => !scope.so_far_ok,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(branch: &str, event: &str) -> Scope {
        let mut vars = BTreeMap::new();
        vars.insert("branch".into(), branch.into());
        vars.insert("event".into(), event.into());
        Scope { vars, so_far_ok: true }
    }

    #[test]
    fn evaluates() {
        let e = parse("branch == 'main' && event != 'pull_request'").expect("parses");
        assert!(e.eval(&scope("main", "push")));
        assert!(!e.eval(&scope("main", "pull_request")));
        let e = parse("startsWith(branch, 'release/') || !success()").expect("parses");
        assert!(e.eval(&scope("release/1.0", "push")));
        assert!(!e.eval(&scope("main", "push")));
    }

    #[test]
    fn reports_offsets() {
        assert_eq!(parse("branch = 'main'").unwrap_err().offset, 7);
        assert_eq!(parse("brunch == 'x'").unwrap_err().offset, 0);
        assert_eq!(parse("(branch == 'x'").unwrap_err().offset, 14);
        assert!(parse("startsWith(branch)").is_err());
        assert!(parse("'unterminated").is_err());
    }
}
