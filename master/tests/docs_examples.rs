//! The published JSON Schema and the compiler agree, and the docs' examples work: every golden
//! case (testdata/compiler) and every YAML example in README.md and docs/ goes through both.
//! The schema may be laxer than the compiler where a type cannot say it (a cycle, an unknown
//! `needs`, a snippet's result), but never stricter, and the mistakes a schema can express
//! (names, unknown keys, types, version, a builder without steps) it must reject too. Every
//! `curl` and `rbb cache` command of the docs runs against a real master and worker and must
//! succeed.

mod support;

use rbb_compiler::snippet::{ChildEvaluator, Limits};
use rbb_compiler::{Options, Origin, Source, compile, decode_text};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::root;

/// Diagnostic codes of mistakes a JSON Schema can express.
const STRUCTURAL: &[&str] = &[
    "unknown-key",
    "wrong-type",
    "bad-name",
    "version",
    "missing-key",
    "no-steps",
    "yaml-syntax",
    "not-utf8",
    "invalid",
];

fn validator(file: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(root().join("schema").join(file)).expect("schema file");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema JSON");
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{file} is not a valid JSON Schema: {e}"))
}

fn evaluator() -> ChildEvaluator {
    // As the master runs it (mimalloc must not reserve more than the runner's memory limit).
    ChildEvaluator::new(env!("CARGO_BIN_EXE_rbb"), Limits { wall: Duration::from_secs(5), memory_mib: 512 })
        .arg("snippet-runner")
        .env("MIMALLOC_ARENA_RESERVE", "16MiB")
}

/// The schema's verdict on one pipeline text: `None` if it accepts, else why not.
fn schema_verdict(v: &jsonschema::Validator, text: &str) -> Option<String> {
    // What an editor's YAML language server validates: merge keys (`<<:`) applied, and an
    // empty document as an empty mapping.
    let value: serde_json::Value = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Null) => serde_json::json!({}),
        Ok(mut y) => match y
            .apply_merge()
            .map_err(|e| e.to_string())
            .and_then(|()| serde_json::to_value(y).map_err(|e| e.to_string()))
        {
            Ok(j) => j,
            Err(e) => return Some(format!("not JSON data: {e}")),
        },
        Err(e) => return Some(format!("not YAML: {e}")),
    };
    let errors: Vec<String> = v.iter_errors(&value).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}

fn source(repo: &str, text: String, not_utf8: Option<rbb_compiler::NotUtf8>, files: &[String]) -> Source {
    Source {
        file: format!("{repo}/.rbb/pipeline.yaml"),
        text,
        branch: "main".into(),
        files: files.to_vec().into(),
        origin: Origin {
            url: format!("repos/{repo}"),
            pipeline_path: ".rbb/pipeline.yaml".into(),
            ..Default::default()
        },
        not_utf8,
        repo: repo.to_owned(),
    }
}

/// Compares the two verdicts on one file; returns a complaint if they disagree.
fn agree(what: &str, schema: Option<String>, codes: &[&str]) -> Option<String> {
    let compiler_rejects = !codes.is_empty();
    let structural: Vec<&&str> = codes.iter().filter(|c| STRUCTURAL.contains(c)).collect();
    match (&schema, compiler_rejects) {
        (Some(why), false) => Some(format!("{what}: the schema rejects what the compiler accepts: {why}")),
        (None, true) if !structural.is_empty() => {
            Some(format!("{what}: the compiler reports {structural:?}, which the schema should catch, but it accepts"))
        }
        _ => None,
    }
}

#[test]
fn the_schema_and_the_compiler_agree_on_every_golden_case() {
    let v = validator("pipeline.schema.json");
    let eval = evaluator();
    let mut complaints = Vec::new();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root().join("testdata/compiler"))
        .expect("testdata/compiler")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() > 20, "golden cases not found");
    for dir in &cases {
        let files: Vec<String> = std::fs::read_to_string(dir.join("files.txt"))
            .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("case")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        inputs.sort();
        let mut sources = Vec::new();
        let mut verdicts = Vec::new();
        for p in &inputs {
            let repo = p.file_stem().expect("stem").to_string_lossy().into_owned();
            let bytes = std::fs::read(p).expect("read");
            let verdict = match std::str::from_utf8(&bytes) {
                Ok(t) => schema_verdict(&v, t),
                Err(_) => Some("not UTF-8".to_owned()),
            };
            let (text, not_utf8) = decode_text(bytes);
            sources.push(source(&repo, text, not_utf8, &files));
            verdicts.push((repo, verdict));
        }
        let opts = Options { other_repos_unknown: false, ..Options::default() };
        let out = compile(&sources, &eval, &opts);
        for (repo, verdict) in verdicts {
            let file = format!("{repo}/.rbb/pipeline.yaml");
            let codes: Vec<&str> =
                out.diagnostics.iter().filter(|d| d.is_error() && d.file == file).map(|d| d.code).collect();
            let what = format!("testdata/compiler/{}/{repo}.yaml", dir.file_name().expect("name").to_string_lossy());
            complaints.extend(agree(&what, verdict, &codes));
        }
    }
    assert!(complaints.is_empty(), "{} disagreements:\n{}", complaints.len(), complaints.join("\n"));
}

/// The fenced blocks of one language in a Markdown file, with the line each starts on.
fn blocks(path: &Path, lang: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).expect("read markdown");
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```") && line.trim_start()[3..].trim() == lang => {
                current = Some((i + 2, String::new()));
            }
            Some(_) if line.trim_start().starts_with("```") => out.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn every_yaml_example_in_the_docs_is_accepted_by_the_schema_and_the_compiler() {
    let pipeline = validator("pipeline.schema.json");
    let config = validator("config.schema.json");
    let eval = evaluator();
    let mut complaints = Vec::new();
    let mut checked = 0;
    for md in markdown_files() {
        for (line, body) in blocks(&md, "yaml") {
            let what = format!("{}:{line}", md.strip_prefix(root()).unwrap_or(&md).display());
            let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(&body) else {
                complaints.push(format!("{what}: not YAML"));
                continue;
            };
            // A fragment of a builder (`matrix:`, `on:`) is checked inside one.
            let fragment = ["matrix", "on", "steps", "needs"].iter().any(|k| value.get(k).is_some())
                && value.get("builders").is_none();
            let body = if fragment {
                let mut b = value.clone();
                if b.get("steps").is_none() {
                    b["steps"] = serde_yaml::from_str("[{ run: 'true' }]").expect("steps");
                }
                let mut p = serde_yaml::Mapping::new();
                let mut builders = serde_yaml::Mapping::new();
                builders.insert("example".into(), b);
                p.insert("builders".into(), serde_yaml::Value::Mapping(builders));
                serde_yaml::to_string(&p).expect("yaml")
            } else {
                body
            };
            let value: serde_yaml::Value = serde_yaml::from_str(&body).expect("yaml");
            let top = |k: &str| value.get(k).is_some();
            if top("repositories") {
                checked += 1;
                if let Some(why) = schema_verdict(&config, &body) {
                    complaints.push(format!("{what}: the config schema rejects the example: {why}"));
                }
                if let Err(e) = serde_yaml::from_str::<rbb_schema::config::MasterConfig>(&body) {
                    complaints.push(format!("{what}: the master does not read the example: {e}"));
                }
                // The checks beyond types (secrets written inline, duplicate names, ...).
                let file = tempfile::NamedTempFile::new().expect("temp file");
                std::fs::write(file.path(), &body).expect("write example");
                if let Err(diags) = rbb_compiler::git::load_config(file.path()) {
                    let why: Vec<String> = diags.iter().map(|d| format!("[{}] {}", d.code, d.message)).collect();
                    complaints.push(format!("{what}: the master refuses the example: {}", why.join("; ")));
                }
            } else if top("builders") || top("templates") || top("generate") {
                checked += 1;
                let src = source("app", body.clone(), None, &[]);
                let opts = Options { other_repos_unknown: true, ..Options::default() };
                let out = compile(&[src], &eval, &opts);
                let errors: Vec<String> = out
                    .diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .map(|d| format!("[{}] {}", d.code, d.message))
                    .collect();
                if !errors.is_empty() {
                    complaints.push(format!("{what}: the compiler rejects the example: {}", errors.join("; ")));
                }
                if let Some(why) = schema_verdict(&pipeline, &body) {
                    complaints.push(format!("{what}: the pipeline schema rejects the example: {why}"));
                }
            }
        }
    }
    assert!(checked >= 3, "only {checked} YAML examples found");
    assert!(complaints.is_empty(), "{} broken examples:\n{}", complaints.len(), complaints.join("\n"));
}

/// The body of the first fenced block of `lang` after the line holding `marker` in `md`.
fn block_after(md: &str, marker: &str, lang: &str) -> String {
    let rest = &md[md.find(marker).unwrap_or_else(|| panic!("no `{marker}`"))..];
    let open = format!("```{lang}\n");
    let body = &rest[rest.find(&open).expect("a block") + open.len()..];
    body[..body.find("\n```").expect("closed")].to_owned()
}

#[test]
fn the_secrets_doc_shows_what_rbb_compile_prints() {
    let md = std::fs::read_to_string(root().join("docs/secrets.md")).expect("docs/secrets.md");
    let pipeline = block_after(&md, "## Using secrets", "yaml");
    let shown = block_after(&md, "`rbb compile` shows which builders use which secrets", "text");
    let declared = [("DEPLOY_TOKEN".to_owned(), vec!["app".to_owned()]), ("NPM_TOKEN".to_owned(), vec![])];
    let opts = Options { secrets: Some(declared.into_iter().collect()), ..Options::default() };
    let out = compile(&[source("app", pipeline, None, &[])], &evaluator(), &opts);
    let plan = out.plan.unwrap_or_else(|| panic!("the example does not compile: {:?}", out.diagnostics));
    let text = rbb_compiler::render::text(&plan);
    for line in shown.lines() {
        assert!(text.lines().any(|l| l == line), "docs/secrets.md shows `{line}`; rbb compile prints:\n{text}");
    }
}

#[test]
fn an_axis_may_be_called_python() {
    let text = "builders:\n  test:\n    matrix:\n      python: ['3.11', '3.12']\n      os: [linux]\n    steps: [{ run: 'tox -e py${{ matrix.python }}' }]\n";
    let out = compile(&[source("app", text.into(), None, &[])], &evaluator(), &Options::default());
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    let plan = out.plan.expect("plan");
    let ids: Vec<&str> = plan.builders.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["app/test[python=3.11,os=linux]", "app/test[python=3.12,os=linux]"]);
    assert_eq!(plan.builders[0].steps[0].run, "tox -e py3.11");
    assert!(schema_verdict(&validator("pipeline.schema.json"), text).is_none());
    // A string is still the snippet.
    let text =
        "builders:\n  test:\n    matrix:\n      python: 'return [{\"os\": \"linux\"}]'\n    steps: [{ run: make }]\n";
    let out = compile(&[source("app", text.into(), None, &[])], &evaluator(), &Options::default());
    assert!(!out.has_errors(), "{:?}", out.diagnostics);
    assert_eq!(out.plan.expect("plan").builders[0].id, "app/test[os=linux]");
}

/// The `curl` commands of the shell blocks of one Markdown file (continuation lines joined).
fn curl_commands(path: &Path) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (start, body) in blocks(path, "sh") {
        let mut pending: Option<(usize, String)> = None;
        for (i, line) in body.lines().enumerate() {
            let line_no = start + i;
            let (text, continues) = match line.trim_end().strip_suffix('\\') {
                Some(t) => (t.to_owned(), true),
                None => (line.to_owned(), false),
            };
            let cmd = match pending.take() {
                Some((n, mut acc)) => {
                    acc.push(' ');
                    acc.push_str(text.trim());
                    (n, acc)
                }
                None => (line_no, text.trim().to_owned()),
            };
            if continues {
                pending = Some(cmd);
            } else if cmd.1.starts_with("curl ") || cmd.1.starts_with("rbb cache ") {
                out.push(cmd);
            }
        }
    }
    out
}

#[test]
fn every_curl_example_in_the_docs_works_against_a_real_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::make_repo(
        &dir.path().join("lib"),
        "builders:\n  build:\n    steps: [{ name: compile, run: 'echo compiled' }]\n",
        &[],
    );
    let config = support::write_config(dir.path(), &["lib"], &[("w1", "t1", &[])]);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("api_token: demo-api-token\n");
    std::fs::write(&config, text).expect("config");
    let m = support::Master::start(&config, &dir.path().join("state"));
    let _w = support::Worker::start(&m, "w1", "t1", &dir.path().join("w1"), &[]);
    // The tour's commands read build 1 and log 1: the demo has built by then.
    let r = support::http(
        &m.http,
        "POST",
        "/api/v2/builders/lib%2Fbuild/force",
        &[("authorization", "Bearer demo-api-token")],
        Some("{}"),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    m.finished(r.json()["build"].as_u64().expect("id"), Duration::from_secs(60));

    let mut ran = 0;
    let mut complaints = Vec::new();
    for md in markdown_files() {
        for (line, cmd) in curl_commands(&md) {
            let what = format!("{}:{line}", md.strip_prefix(root()).unwrap_or(&md).display());
            let cmd = cmd.replace("http://127.0.0.1:8010", &format!("http://{}", m.http));
            let run = match cmd.strip_prefix("rbb ") {
                Some(args) => format!("{} {args}", env!("CARGO_BIN_EXE_rbb")),
                None => format!(
                    "{} -sS --fail-with-body --max-time 20 -o /dev/null -w '%{{http_code}}' {}",
                    "curl",
                    &cmd[5..]
                ),
            };
            let out = std::process::Command::new("sh").arg("-c").arg(&run).output().expect("run curl");
            ran += 1;
            if !out.status.success() {
                complaints.push(format!(
                    "{what}: `{cmd}` failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    assert!(ran >= 5, "only {ran} curl examples found");
    assert!(complaints.is_empty(), "{} broken curl examples:\n{}", complaints.len(), complaints.join("\n"));
}
