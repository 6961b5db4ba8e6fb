//! Front end: one pipeline file's text to typed builder definitions, with diagnostics.
//!
//! Order of work: YAML syntax (serde_yaml, with its position), `<<` merges, the top-level
//! keys, `templates`, the `generate` snippet, then each builder on its own (`extends:`
//! applied at the value level, then typed through serde with the error's path kept), so one
//! bad builder does not hide the mistakes in the next. Positions come from [`SpanIndex`].

use crate::diagnostic::{Diagnostic, Diagnostics, Printed, Severity, did_you_mean, name_list};
use crate::snippet::{Evaluator, SnippetError};
use crate::spans::{Path, Pos, Seg, SpanIndex, key};
use rbb_schema::pipeline::Builder;
use serde_yaml::{Mapping, Value};
use std::collections::HashSet;

/// One repository's pipeline file, as the compiler receives it.
#[derive(Debug, Clone)]
pub struct Source {
    /// Repository name: the namespace of its builders.
    pub repo: String,
    /// The file as shown in diagnostics, e.g. `app/.rbb/pipeline.yaml`.
    pub file: String,
    pub text: String,
    /// Branch the file was read from (given to snippets, default of schedules).
    pub branch: String,
    /// Paths of every file in the commit (given to snippets). May be empty.
    pub files: FileList,
    /// Where it came from, recorded in the plan.
    pub origin: Origin,
    /// Set when the file's bytes are not UTF-8: `text` is then a lossy copy, good only for
    /// showing the line, and the file yields one diagnostic and no builders.
    pub not_utf8: Option<NotUtf8>,
}

/// The paths of a commit's files, shared between copies of a [`Source`] and hashed once: a
/// fleet's compile copies and compares sources without touching every path again.
#[derive(Clone, Default)]
pub struct FileList {
    paths: std::sync::Arc<Vec<String>>,
    digest: [u8; 32],
}

impl FileList {
    pub fn new(paths: Vec<String>) -> FileList {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((paths.len() as u64).to_le_bytes());
        for p in &paths {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        FileList { digest: h.finalize().into(), paths: std::sync::Arc::new(paths) }
    }

    /// The SHA-256 of the paths, in order, each prefixed with its length.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

impl From<Vec<String>> for FileList {
    fn from(paths: Vec<String>) -> FileList {
        FileList::new(paths)
    }
}

impl std::ops::Deref for FileList {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.paths
    }
}

impl PartialEq for FileList {
    fn eq(&self, other: &FileList) -> bool {
        self.digest == other.digest
    }
}

impl Eq for FileList {}

impl std::fmt::Debug for FileList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.paths.iter()).finish()
    }
}

impl serde::Serialize for FileList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.paths.serialize(s)
    }
}

/// The first byte of a file that is not UTF-8, with its 1-based line and column (the column
/// counts characters, as every other diagnostic does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8 {
    pub line: u32,
    pub col: u32,
    pub byte: u8,
}

/// A file's bytes as text. Invalid UTF-8 is never replaced silently: the second value says
/// where the first bad byte is, and the text (lossy, for display only) must not be compiled.
pub fn decode_text(bytes: Vec<u8>) -> (String, Option<NotUtf8>) {
    match String::from_utf8(bytes) {
        Ok(text) => (text, None),
        Err(e) => {
            let bytes = e.into_bytes();
            let valid = match std::str::from_utf8(&bytes) {
                Ok(_) => bytes.len(),
                Err(e) => e.valid_up_to(),
            };
            // The prefix up to `valid` is UTF-8 by construction.
            let prefix = std::str::from_utf8(&bytes[..valid]).unwrap_or_default();
            let line = prefix.matches('\n').count() as u32 + 1;
            let line_start = prefix.rfind('\n').map_or(0, |i| i + 1);
            let col = prefix[line_start..].chars().count() as u32 + 1;
            let byte = bytes.get(valid).copied().unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), Some(NotUtf8 { line, col, byte }))
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub url: String,
    pub commit: Option<String>,
    pub blob: Option<String>,
    pub pipeline_path: String,
}

pub(crate) const TOP_KEYS: [&str; 4] = ["version", "templates", "builders", "generate"];

/// Positions and error helpers for one file.
pub(crate) struct FileCtx<'a> {
    pub src: &'a Source,
    pub spans: SpanIndex,
}

impl FileCtx<'_> {
    pub fn diag(&self, code: &'static str, pos: Pos, message: String, hint: Option<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            repo: Some(self.src.repo.clone()),
            file: self.src.file.clone(),
            line: pos.line,
            col: pos.col,
            message,
            hint,
        }
    }

    pub fn warn(&self, code: &'static str, pos: Pos, message: String, hint: Option<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..self.diag(code, pos, message, hint) }
    }
}

/// A builder definition that typed cleanly, with where to point when later passes complain.
#[derive(Debug, Clone)]
pub(crate) struct ParsedBuilder {
    pub name: String,
    pub spec: Builder,
    /// Path of the builder's mapping in the file.
    pub base: Path,
    /// Set for builders returned by the `generate` snippet: every position is the snippet's.
    pub generated_at: Option<Pos>,
}

impl ParsedBuilder {
    /// Position of the key that ends `rel` under this builder.
    pub fn key_pos(&self, ctx: &FileCtx, rel: &[Seg]) -> Pos {
        if let Some(p) = self.generated_at {
            return p;
        }
        let mut p = self.base.clone();
        p.extend_from_slice(rel);
        ctx.spans.key(&p)
    }

    /// Position of the value at `rel` under this builder.
    pub fn pos(&self, ctx: &FileCtx, rel: &[Seg]) -> Pos {
        if let Some(p) = self.generated_at {
            return p;
        }
        let mut p = self.base.clone();
        p.extend_from_slice(rel);
        ctx.spans.value(&p)
    }
}

/// What one file yields.
pub(crate) struct ParsedFile<'a> {
    pub ctx: FileCtx<'a>,
    pub builders: Vec<ParsedBuilder>,
    /// Builders that exist but could not be read (already reported): `needs` naming them
    /// are not reported again.
    pub broken: Vec<String>,
    /// The whole file could not be read (encoding, YAML syntax, not a mapping): no builder
    /// of this repository is known, so `needs` naming any of them are not reported again.
    pub unreadable: bool,
}

/// Whether `name` may name a builder, a template, a repository or a matrix axis.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name.len() <= 100
}

/// Whether `name` is a valid environment variable name (also the form of a secret's name):
/// a letter or `_`, then letters, digits and `_`.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) fn parse_file<'a>(src: &'a Source, eval: &dyn Evaluator, diags: &mut Diagnostics) -> ParsedFile<'a> {
    if let Some(bad) = src.not_utf8 {
        let ctx = FileCtx { src, spans: SpanIndex::default() };
        diags.push(
            ctx.diag(
                "not-utf8",
                Pos { line: bad.line, col: bad.col },
                format!("the pipeline file is not UTF-8: byte 0x{:02X} cannot be read as text", bad.byte),
                Some(
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`); rbb never guesses an encoding, \
                 so a step always runs the command that was committed"
                        .into(),
                ),
            ),
        );
        return ParsedFile { ctx, builders: Vec::new(), broken: Vec::new(), unreadable: true };
    }
    let ctx = FileCtx { src, spans: SpanIndex::build(&src.text) };
    let mut builders = Vec::new();
    let value: Value = match serde_yaml::from_str(&src.text) {
        Ok(v) => v,
        Err(e) => {
            diags.push(yaml_error(&ctx, &e));
            return ParsedFile { ctx, builders, broken: Vec::new(), unreadable: true };
        }
    };
    let mut value = value;
    if let Err(e) = value.apply_merge() {
        diags.push(ctx.diag("yaml-merge", Pos { line: 1, col: 1 }, format!("cannot apply `<<` merge: {e}"), None));
        return ParsedFile { ctx, builders, broken: Vec::new(), unreadable: true };
    }
    let top = match value {
        Value::Mapping(m) => m,
        Value::Null => {
            diags.push(ctx.warn(
                "empty-pipeline",
                Pos { line: 1, col: 1 },
                "the pipeline file is empty".into(),
                Some("add `builders:` with at least one builder".into()),
            ));
            return ParsedFile { ctx, builders, broken: Vec::new(), unreadable: false };
        }
        other => {
            diags.push(ctx.diag(
                "wrong-type",
                Pos { line: 1, col: 1 },
                format!("a pipeline is a mapping with `builders:`, found {}", kind(&other)),
                Some("start the file with `builders:`".into()),
            ));
            return ParsedFile { ctx, builders, broken: Vec::new(), unreadable: true };
        }
    };

    for (k, v) in &top {
        let Some(name) = k.as_str() else {
            diags.push(ctx.diag("wrong-type", Pos { line: 1, col: 1 }, "top-level keys must be strings".into(), None));
            continue;
        };
        if TOP_KEYS.contains(&name) {
            continue;
        }
        let pos = ctx.spans.key(&[key(name)]);
        let looks_like_builder = v.as_mapping().is_some_and(|m| m.contains_key("steps"));
        let hint = if looks_like_builder {
            Some(format!("builders belong under `builders:`; indent `{name}` below it"))
        } else {
            did_you_mean(name, TOP_KEYS).or_else(|| Some(format!("top-level keys: {}", TOP_KEYS.join(", "))))
        };
        diags.push(ctx.diag("unknown-key", pos, format!("unknown top-level key `{name}`"), hint));
    }

    if let Some(v) = top.get("version")
        && v.as_u64() != Some(1)
    {
        diags.push(ctx.diag(
            "version",
            ctx.spans.value(&[key("version")]),
            format!("unsupported pipeline version {}", scalar_text(v)),
            Some("this rbb reads `version: 1`".into()),
        ));
    }

    let templates = mapping_at(&ctx, &top, "templates", diags);
    let mut broken_templates = HashSet::new();
    for (name, tv) in &templates {
        let Some(name) = name.as_str() else { continue };
        let base = vec![key("templates"), key(name)];
        if !valid_name(name) {
            diags.push(bad_name(&ctx, &base, "template", name));
        }
        let mut stripped = tv.clone();
        if let Value::Mapping(m) = &mut stripped {
            m.remove("extends");
        }
        if let Err(d) = type_builder(&ctx, stripped, &base, None, &format!("template `{name}`")) {
            broken_templates.insert(name.to_owned());
            diags.push(d);
        }
    }

    let declared = mapping_at(&ctx, &top, "builders", diags);
    let mut broken = Vec::new();
    let mut seen = HashSet::new();
    for (name, bv) in &declared {
        let Some(name) = name.as_str() else {
            diags.push(ctx.diag(
                "wrong-type",
                ctx.spans.value(&[key("builders")]),
                "builder names must be strings".into(),
                None,
            ));
            continue;
        };
        let base = vec![key("builders"), key(name)];
        if !valid_name(name) {
            diags.push(bad_name(&ctx, &base, "builder", name));
            continue;
        }
        seen.insert(name.to_owned());
        let merged = match apply_extends(&ctx, bv, &templates, &base, &mut Vec::new(), diags) {
            Some(v) => v,
            None => {
                broken.push(name.to_owned());
                continue;
            }
        };
        let extends_broken = template_names(bv).iter().any(|t| broken_templates.contains(t));
        match type_builder(&ctx, merged, &base, None, &format!("builder `{name}`")) {
            Ok(spec) => builders.push(ParsedBuilder { name: name.to_owned(), spec, base, generated_at: None }),
            Err(d) => {
                broken.push(name.to_owned());
                // A mistake inherited from a broken template is reported once, at the template.
                if !(extends_broken && d.line == ctx.spans.value(&base).line) {
                    diags.push(d);
                }
            }
        }
    }

    if let Some(gen_value) = top.get("generate") {
        generate(&ctx, gen_value, &top, &templates, eval, &mut seen, &mut builders, diags);
    }

    if builders.is_empty() && !diags.has_errors() && declared.is_empty() && top.get("generate").is_none() {
        diags.push(ctx.warn(
            "no-builders",
            Pos { line: 1, col: 1 },
            "the pipeline defines no builders".into(),
            Some("add a builder under `builders:`".into()),
        ));
    }
    ParsedFile { ctx, builders, broken, unreadable: false }
}

#[allow(clippy::too_many_arguments)]
fn generate(
    ctx: &FileCtx,
    gen_value: &Value,
    top: &Mapping,
    templates: &Mapping,
    eval: &dyn Evaluator,
    seen: &mut HashSet<String>,
    builders: &mut Vec<ParsedBuilder>,
    diags: &mut Diagnostics,
) {
    let gen_path = vec![key("generate")];
    let code_path = vec![key("generate"), key("python")];
    let code = match serde_path_to_error::deserialize::<_, rbb_schema::pipeline::PythonSnippet>(gen_value.clone()) {
        Ok(s) => s.python,
        Err(e) => {
            diags.push(type_diag(ctx, &gen_path, None, e, "`generate`"));
            return;
        }
    };
    let snippet_ctx = serde_json::json!({
        "repo": ctx.src.repo,
        "branch": ctx.src.branch,
        "files": ctx.src.files,
        "pipeline": serde_json::to_value(Value::Mapping(top.clone())).unwrap_or_default(),
    });
    let at = ctx.spans.value(&code_path);
    let Some(result) = run_snippet(ctx, &code_path, eval, &code, &snippet_ctx, "`generate:`", diags) else {
        return;
    };
    let serde_json::Value::Object(map) = result else {
        diags.push(ctx.diag(
            "snippet-result",
            at,
            format!(
                "the snippet of `generate:` returned {}, not a mapping of builder name to builder",
                json_kind(&result)
            ),
            Some("return a dict such as {\"test\": {\"steps\": [{\"run\": \"make test\"}]}}".into()),
        ));
        return;
    };
    for (name, bv) in map {
        if !valid_name(&name) {
            diags.push(ctx.diag(
                "bad-name",
                at,
                format!("the snippet of `generate:` returned an invalid builder name `{name}`"),
                Some("names start with a letter or digit and use only letters, digits, `.`, `_` and `-`".into()),
            ));
            continue;
        }
        if !seen.insert(name.clone()) {
            diags.push(ctx.diag(
                "duplicate-builder",
                at,
                format!("the snippet of `generate:` returned builder `{name}`, which `builders:` already defines"),
                Some("rename one of them".into()),
            ));
            continue;
        }
        let Ok(bv) = serde_yaml::to_value(&bv) else { continue };
        let base = vec![key("builders"), key(&name)];
        let Some(merged) = apply_extends(ctx, &bv, templates, &gen_path, &mut Vec::new(), diags) else {
            continue;
        };
        match type_builder(
            ctx,
            merged,
            &base,
            Some(at),
            &format!("builder `{name}` returned by the snippet of `generate:`"),
        ) {
            Ok(spec) => builders.push(ParsedBuilder { name, spec, base, generated_at: Some(at) }),
            Err(d) => diags.push(d),
        }
    }
}

fn mapping_at(ctx: &FileCtx, top: &Mapping, name: &str, diags: &mut Diagnostics) -> Mapping {
    match top.get(name) {
        None | Some(Value::Null) => Mapping::new(),
        Some(Value::Mapping(m)) => m.clone(),
        Some(other) => {
            diags.push(ctx.diag(
                "wrong-type",
                ctx.spans.value(&[key(name)]),
                format!("`{name}` must be a mapping of name to builder, found {}", kind(other)),
                Some(format!("write `{name}:` followed by indented `<name>:` entries")),
            ));
            Mapping::new()
        }
    }
}

fn bad_name(ctx: &FileCtx, base: &Path, what: &str, name: &str) -> Diagnostic {
    ctx.diag(
        "bad-name",
        ctx.spans.key(base),
        format!("invalid {what} name `{name}`"),
        Some("names start with a letter or digit and use only letters, digits, `.`, `_` and `-`".into()),
    )
}

fn template_names(v: &Value) -> Vec<String> {
    match v.get("extends") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Sequence(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// The builder's value with its templates merged underneath it.
fn apply_extends(
    ctx: &FileCtx,
    value: &Value,
    templates: &Mapping,
    base: &Path,
    chain: &mut Vec<String>,
    diags: &mut Diagnostics,
) -> Option<Value> {
    let Value::Mapping(own) = value else {
        return Some(value.clone());
    };
    let Some(ext) = own.get("extends") else {
        return Some(value.clone());
    };
    let mut ext_path = base.clone();
    ext_path.push(key("extends"));
    let names = match ext {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) if items.iter().all(|i| i.is_string()) => {
            items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect()
        }
        _ => {
            diags.push(ctx.diag(
                "wrong-type",
                ctx.spans.value(&ext_path),
                "`extends` takes a template name or a list of template names".into(),
                None,
            ));
            return None;
        }
    };
    let mut acc = Value::Mapping(Mapping::new());
    for name in names {
        let Some(t) = templates.get(name.as_str()) else {
            let known: Vec<&str> = templates.keys().filter_map(Value::as_str).collect();
            let hint = did_you_mean(&name, known.iter().copied())
                .map(|d| format!("{d} templates: {}", name_list(&known, 10)))
                .unwrap_or_else(|| format!("templates in this file: {}", name_list(&known, 10)));
            diags.push(ctx.diag(
                "unknown-template",
                ctx.spans.value(&ext_path),
                format!("no template named `{name}`"),
                Some(hint),
            ));
            return None;
        };
        if chain.contains(&name) {
            chain.push(name.clone());
            diags.push(ctx.diag(
                "template-cycle",
                ctx.spans.value(&ext_path),
                format!("templates extend each other in a cycle: {}", chain.join(" → ")),
                Some("break the cycle by removing one `extends`".into()),
            ));
            return None;
        }
        chain.push(name.clone());
        let t_path = vec![key("templates"), key(&name)];
        let resolved = apply_extends(ctx, t, templates, &t_path, chain, diags)?;
        chain.pop();
        acc = deep_merge(acc, resolved);
    }
    let mut own = own.clone();
    own.remove("extends");
    Some(deep_merge(acc, Value::Mapping(own)))
}

/// `over` on top of `under`: mappings merge key by key, anything else is replaced.
pub(crate) fn deep_merge(under: Value, over: Value) -> Value {
    match (under, over) {
        (Value::Mapping(mut u), Value::Mapping(o)) => {
            for (k, v) in o {
                let merged = match u.remove(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => v,
                };
                u.insert(k, merged);
            }
            Value::Mapping(u)
        }
        (_, over) => over,
    }
}

#[allow(clippy::result_large_err)] // a cold path: the error is one diagnostic
fn type_builder(
    ctx: &FileCtx,
    value: Value,
    base: &Path,
    generated_at: Option<Pos>,
    what: &str,
) -> Result<Builder, Diagnostic> {
    if !value.is_mapping() {
        let pos = generated_at.unwrap_or_else(|| ctx.spans.value(base));
        return Err(ctx.diag(
            "wrong-type",
            pos,
            format!("{what} must be a mapping with `steps:`, found {}", kind(&value)),
            None,
        ));
    }
    serde_path_to_error::deserialize::<_, Builder>(value).map_err(|e| type_diag(ctx, base, generated_at, e, what))
}

/// Turns a serde error with its path into a diagnostic at the right place.
pub(crate) fn type_diag(
    ctx: &FileCtx,
    base: &Path,
    generated_at: Option<Pos>,
    err: serde_path_to_error::Error<serde_yaml::Error>,
    what: &str,
) -> Diagnostic {
    let mut path = base.clone();
    for seg in err.path().iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key: k } => path.push(Seg::Key(k.clone())),
            serde_path_to_error::Segment::Enum { variant } => path.push(Seg::Key(variant.clone())),
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    let inner = err.inner().to_string();
    let inner = match inner.find(" at line ") {
        Some(i) => inner[..i].to_owned(),
        None => inner,
    };
    let rel = crate::spans::display(&path[base.len().min(path.len())..]);
    let place = if rel.is_empty() { what.to_owned() } else { format!("{what}, at `{rel}`") };
    let pos_of = |p: &Path| generated_at.unwrap_or_else(|| ctx.spans.value(p));
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let _ = rest;
        let mut quoted = inner.split('`').skip(1).step_by(2).map(str::to_owned);
        let field = quoted.next().unwrap_or_default();
        let expected: Vec<String> = quoted.collect();
        let mut key_path = path.clone();
        if key_path.last() != Some(&Seg::Key(field.clone())) {
            key_path.push(Seg::Key(field.clone()));
        }
        let pos = generated_at.unwrap_or_else(|| ctx.spans.key(&key_path));
        let hint = did_you_mean(&field, expected.iter().map(String::as_str))
            .or_else(|| Some(format!("known keys here: {}", expected.join(", "))));
        let owner_path = &key_path[..key_path.len() - 1];
        let owner_rel = crate::spans::display(&owner_path[base.len().min(owner_path.len())..]);
        let owner = if owner_rel.is_empty() { what.to_owned() } else { format!("{what}, at `{owner_rel}`") };
        return ctx.diag("unknown-key", pos, format!("unknown key `{field}` in {owner}"), hint);
    }
    if let Some(rest) = inner.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or_default();
        return ctx.diag(
            "missing-key",
            pos_of(&path),
            format!("{place} lacks the required key `{field}`"),
            Some(format!("add `{field}:`")),
        );
    }
    if let Some(rest) = inner.strip_prefix("invalid type: ") {
        // serde says "invalid type: string \"x\", expected a sequence"; say it in YAML's words.
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "something else"));
        let expected = yaml_words(expected);
        let hint = match expected.as_str() {
            "a list" => Some("write a list: `[a, b]`, or one `- item` per line".to_owned()),
            "a mapping" => Some("write a mapping: `key: value` pairs, or `{ key: value }`".to_owned()),
            "a whole number" => Some("write a number without quotes, e.g. `10`".to_owned()),
            _ => None,
        };
        return ctx.diag(
            "wrong-type",
            pos_of(&path),
            format!("{place} must be {expected}, found {}", yaml_words(found)),
            hint,
        );
    }
    if inner.starts_with("invalid value") {
        return ctx.diag("wrong-type", pos_of(&path), format!("{place}: {inner}"), None);
    }
    ctx.diag("invalid", pos_of(&path), format!("{place}: {inner}"), None)
}

fn yaml_error(ctx: &FileCtx, e: &serde_yaml::Error) -> Diagnostic {
    let (mut line, mut col) = e.location().map(|l| (l.line() as u32, l.column() as u32)).unwrap_or((1, 1));
    if e.to_string().contains("duplicate entry") {
        // serde_yaml points at the mapping; the second occurrence is what needs fixing.
        if let Some(pos) = ctx.spans.first_duplicate() {
            line = pos.line;
            col = pos.col;
        }
    }
    let text = e.to_string();
    let message = match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    };
    let hint = if message.contains("duplicate entry") {
        Some("each key may appear once in a mapping; rename or remove the second one".to_owned())
    } else if message.contains("tab") {
        Some("indent with spaces, not tabs".to_owned())
    } else if message.contains("mapping values are not allowed") {
        Some("a value containing `: ` must be quoted, or a key is indented wrongly".to_owned())
    } else {
        Some("check the indentation and quoting around this position".to_owned())
    };
    ctx.diag("yaml-syntax", Pos { line, col }, format!("YAML syntax error: {message}"), hint)
}

/// Runs the snippet at `code_path`: its value, or `None` after reporting why not. What it
/// printed goes with the diagnostic when it fails, and to the compile's printed output.
pub(crate) fn run_snippet(
    ctx: &FileCtx,
    code_path: &Path,
    eval: &dyn Evaluator,
    code: &str,
    snippet_ctx: &serde_json::Value,
    what: &str,
    diags: &mut Diagnostics,
) -> Option<serde_json::Value> {
    let evaluation = eval.eval(code, snippet_ctx);
    if !evaluation.output.is_empty() {
        let at = ctx.spans.value(code_path);
        diags.push_printed(Printed {
            repo: ctx.src.repo.clone(),
            file: ctx.src.file.clone(),
            line: at.line,
            col: at.col,
            what: what.to_owned(),
            text: evaluation.output.clone(),
        });
    }
    match evaluation.result {
        Ok(v) => Some(v),
        Err(e) => {
            let mut d = snippet_diag(ctx, code_path, &e, what);
            if !evaluation.output.is_empty() {
                let shown: String = evaluation.output.trim_end().chars().take(400).collect();
                let more = if shown.len() < evaluation.output.trim_end().len() { "…" } else { "" };
                d.message.push_str(&format!(" (it printed {shown:?}{more})"));
            }
            diags.push(d);
            None
        }
    }
}

/// A snippet failure as a diagnostic, with snippet lines mapped into the YAML file.
pub(crate) fn snippet_diag(ctx: &FileCtx, code_path: &Path, err: &SnippetError, what: &str) -> Diagnostic {
    // The position index puts a block scalar (`python: |`) at its first content line and
    // a quoted one at its opening quote.
    let block = ctx.spans.value(code_path);
    let line_text = ctx.src.text.lines().nth(block.line.saturating_sub(1) as usize).unwrap_or("");
    let first = line_text.chars().nth(block.col.saturating_sub(1) as usize);
    let quoted = matches!(first, Some('"') | Some('\''));
    let map = |line: u32, col: u32| -> Pos {
        if quoted {
            Pos { line: block.line, col: block.col + col }
        } else {
            Pos { line: block.line + line.saturating_sub(1), col: block.col + col.saturating_sub(1) }
        }
    };
    let at_line = |line: Option<u32>| line.map(|l| map(l, 1)).unwrap_or(block);
    match err {
        SnippetError::Syntax { line, col, message } => ctx.diag(
            "snippet-syntax",
            map(*line, *col),
            format!("Python syntax error in the snippet of {what}: {message}"),
            Some("the snippet is the body of a function of `ctx`; end it with `return <value>`".into()),
        ),
        SnippetError::Raised { line, exception, message } => ctx.diag(
            "snippet-raised",
            at_line(*line),
            format!("the snippet of {what} raised {exception}: {message}"),
            None,
        ),
        SnippetError::Forbidden { line, message } => ctx.diag(
            "snippet-forbidden",
            at_line(*line),
            format!("the snippet of {what} was stopped: {message}"),
            Some("snippets are pure: compute from `ctx` (repo, branch, files, pipeline) only".into()),
        ),
        SnippetError::BadResult { message } => ctx.diag(
            "snippet-result",
            block,
            format!("the snippet of {what} returned something that is not plain data: {message}"),
            None,
        ),
        SnippetError::Timeout { limit_ms } => ctx.diag(
            "snippet-timeout",
            block,
            format!("the snippet of {what} ran longer than {} ms and was stopped", limit_ms),
            Some("snippets must finish quickly; look for a loop that never ends".into()),
        ),
        SnippetError::OutOfMemory { limit_mib } => ctx.diag(
            "snippet-memory",
            block,
            if *limit_mib > 0 {
                format!("the snippet of {what} used more than {limit_mib} MiB of memory and was stopped")
            } else {
                format!("the snippet of {what} ran out of memory and was stopped")
            },
            Some("snippets get little memory; build smaller values".into()),
        ),
        SnippetError::Crashed { message } => ctx.diag(
            "snippet-crash",
            block,
            format!("the snippet of {what} crashed the interpreter ({message})"),
            Some(if message.starts_with("stack overflow") {
                "nest calls or data less deeply: the recursion limit cannot be raised in a snippet".into()
            } else {
                "the interpreter cannot run this code; simplify the snippet (plain data in, plain data out)".into()
            }),
        ),
        SnippetError::Runner { message } => {
            ctx.diag("snippet-runner", block, format!("cannot evaluate the snippet of {what}: {message}"), None)
        }
    }
}

/// serde's type words in YAML's: "sequence" → "a list", "i32" → "a whole number".
fn yaml_words(text: &str) -> String {
    let t = text.trim();
    let word = match t {
        "a sequence" | "sequence" => "a list",
        "a map" | "map" => "a mapping",
        "i32" | "u32" | "u64" | "i64" | "usize" | "u16" | "u8" => "a whole number",
        "a boolean" | "boolean" => "true or false",
        "unit value" => "nothing",
        _ => {
            return t
                .replace("string ", "the text ")
                .replace("sequence", "a list")
                .replace("map", "a mapping")
                .replace("integer ", "the number ")
                .replace("floating point ", "the number ");
        }
    };
    word.to_owned()
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "None",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a dict",
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        Value::Number(n) => n.to_string(),
        other => kind(other).to_owned(),
    }
}
