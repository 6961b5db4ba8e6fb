//! The secrets the master config declares: their values, read at start from files or
//! environment variables of the master, and what a leased step gets of them.
//!
//! Values live only here, in memory. They never enter a plan, a cache key, redb, the API, a
//! log line or an error message: everything this module says about a secret names it (and
//! its file or variable), never shows it. [`Secrets`]' `Debug` prints names and versions.

use rbb_compiler::git::LoadedConfig;
use rbb_schema::plan::PlanStep;
use std::collections::{BTreeMap, HashMap};

/// Shortest value accepted: shorter ones could not be masked in logs without masking
/// everything else (`abc` is in many words), so they are refused when the config is read.
pub const MIN_SECRET_LEN: usize = 4;

/// Why a secret could not be read. Names the secret and where it was looked for.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret `{name}`: cannot read its file {path}: {source}")]
    File {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret `{name}`: the file {path} is not UTF-8 text")]
    NotText { name: String, path: String },
    #[error("secret `{name}`: the environment variable {var} is not set in the master's environment")]
    EnvMissing { name: String, var: String },
    #[error("secret `{name}`: the environment variable {var} is not UTF-8 text")]
    EnvNotText { name: String, var: String },
    #[error(
        "secret `{name}` ({from}) is {len} bytes long; secrets must be at least {MIN_SECRET_LEN} bytes so that they can be masked in logs"
    )]
    TooShort { name: String, from: String, len: usize },
    #[error("secret `{name}` says neither `file` nor `env`")]
    NoSource { name: String },
}

/// One declared secret.
#[derive(Clone)]
struct Secret {
    value: String,
    version: u64,
    /// Repositories that may use it; empty means all.
    repositories: Vec<String>,
}

/// Every declared secret, by name.
#[derive(Clone, Default)]
pub struct Secrets {
    by_name: BTreeMap<String, Secret>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (name, s) in &self.by_name {
            m.entry(name, &format_args!("version {} <hidden>", s.version));
        }
        m.finish()
    }
}

/// What a leased step gets: its secret variables with the values filled in, and the values
/// the worker must mask.
#[derive(Default)]
pub struct StepSecrets {
    pub env: HashMap<String, String>,
    pub mask: Vec<String>,
}

impl std::fmt::Debug for StepSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepSecrets").field("env", &self.env.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

impl Secrets {
    /// Reads every secret the config declares. Relative files are relative to the config.
    pub fn load(cfg: &LoadedConfig) -> Result<Secrets, SecretError> {
        let mut by_name = BTreeMap::new();
        for (name, decl) in &cfg.config.secrets {
            let (value, from) = match (&decl.file, &decl.env) {
                (Some(file), _) => {
                    let path = {
                        let p = std::path::PathBuf::from(file);
                        if p.is_absolute() { p } else { cfg.dir().join(p) }
                    };
                    let shown = path.display().to_string();
                    let bytes = std::fs::read(&path).map_err(|source| SecretError::File {
                        name: name.clone(),
                        path: shown.clone(),
                        source,
                    })?;
                    let text = String::from_utf8(bytes)
                        .map_err(|_| SecretError::NotText { name: name.clone(), path: shown.clone() })?;
                    (strip_one_newline(text), format!("file {shown}"))
                }
                (None, Some(var)) => {
                    let value = std::env::var(var).map_err(|e| match e {
                        std::env::VarError::NotPresent => {
                            SecretError::EnvMissing { name: name.clone(), var: var.clone() }
                        }
                        std::env::VarError::NotUnicode(_) => {
                            SecretError::EnvNotText { name: name.clone(), var: var.clone() }
                        }
                    })?;
                    (value, format!("environment variable {var}"))
                }
                (None, None) => return Err(SecretError::NoSource { name: name.clone() }),
            };
            if value.len() < MIN_SECRET_LEN {
                return Err(SecretError::TooShort { name: name.clone(), from, len: value.len() });
            }
            by_name.insert(
                name.clone(),
                Secret { value, version: decl.effective_version(), repositories: decl.repositories.clone() },
            );
        }
        Ok(Secrets { by_name })
    }

    /// Names and the repositories that may use each (empty: all), for the compiler.
    pub fn declared(&self) -> BTreeMap<String, Vec<String>> {
        self.by_name.iter().map(|(n, s)| (n.clone(), s.repositories.clone())).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The version of each secret `step` uses (part of its full cache key). A secret no longer
    /// declared has none.
    pub fn versions(&self, step: &PlanStep) -> BTreeMap<String, Option<u64>> {
        step.secret_names().into_iter().map(|n| (n.to_owned(), self.by_name.get(n).map(|s| s.version))).collect()
    }

    /// The secret variables of `step` of a build of `repo`, values filled in. `Err` names the
    /// secret that is not declared (any more) or that `repo` may not use.
    pub fn for_step(&self, repo: &str, step: &PlanStep) -> Result<StepSecrets, String> {
        let mut out = StepSecrets::default();
        for name in step.secret_names() {
            let Some(s) = self.by_name.get(name) else {
                return Err(format!("secret `{name}` is not declared in the master config"));
            };
            if !s.repositories.is_empty() && !s.repositories.iter().any(|r| r == repo) {
                return Err(format!("repository `{repo}` may not use secret `{name}`"));
            }
            out.mask.push(s.value.clone());
        }
        for var in step.secrets.keys() {
            let template = step.env.get(var).map(String::as_str).unwrap_or_default();
            out.env.insert(var.clone(), self.fill(template));
        }
        Ok(out)
    }

    /// `template` with every `${{ secrets.NAME }}` of a declared secret replaced by its value.
    fn fill(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("${{ secrets.") {
            out.push_str(&rest[..start]);
            let after = &rest[start + "${{ secrets.".len()..];
            match after.find(" }}") {
                Some(end) if self.by_name.contains_key(&after[..end]) => {
                    out.push_str(&self.by_name[&after[..end]].value);
                    rest = &after[end + 3..];
                }
                _ => {
                    out.push_str("${{ secrets.");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// A file's value without the one newline editors and `echo` put at its end.
fn strip_one_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(pairs: &[(&str, &str, &[&str])]) -> Secrets {
        Secrets {
            by_name: pairs
                .iter()
                .map(|(n, v, repos)| {
                    (
                        (*n).to_owned(),
                        Secret {
                            value: (*v).to_owned(),
                            version: 1,
                            repositories: repos.iter().map(|r| (*r).to_owned()).collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn step(env: &[(&str, &str, &[&str])]) -> PlanStep {
        let mut s: PlanStep = serde_json::from_value(serde_json::json!({
            "name": "s", "run": "true", "timeout_secs": 1, "halt_on_failure": true,
            "flunk_on_failure": true, "warn_on_failure": false, "always_run": false, "key": "k"
        }))
        .expect("step");
        for (var, value, names) in env {
            s.env.insert((*var).to_owned(), (*value).to_owned());
            if !names.is_empty() {
                s.secrets.insert((*var).to_owned(), names.iter().map(|n| (*n).to_owned()).collect());
            }
        }
        s
    }

    #[test]
    fn fills_whole_and_embedded_values_and_names_what_to_mask() {
        let all = secrets(&[("TOKEN", "s3cr3t-value", &[]), ("NPM", "npm-123456", &["app"])]);
        let s = step(&[
            ("A", "${{ secrets.TOKEN }}", &["TOKEN"]),
            ("B", "Bearer ${{ secrets.TOKEN }}:${{ secrets.NPM }}!", &["NPM", "TOKEN"]),
            ("PLAIN", "x", &[]),
        ]);
        let got = all.for_step("app", &s).expect("allowed");
        assert_eq!(got.env["A"], "s3cr3t-value");
        assert_eq!(got.env["B"], "Bearer s3cr3t-value:npm-123456!");
        assert!(!got.env.contains_key("PLAIN"));
        assert_eq!(got.mask, vec!["npm-123456".to_owned(), "s3cr3t-value".to_owned()]);
        let refused = all.for_step("lib", &s).expect_err("lib may not use NPM");
        assert!(refused.contains("`NPM`") && !refused.contains("npm-123456"), "{refused}");
        let gone = secrets(&[]).for_step("app", &s).expect_err("undeclared");
        assert!(gone.contains("not declared"), "{gone}");
        assert!(!format!("{all:?}").contains("s3cr3t"));
        assert!(!format!("{got:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_file_loses_one_trailing_newline() {
        assert_eq!(strip_one_newline("abcd\n".into()), "abcd");
        assert_eq!(strip_one_newline("abcd\r\n".into()), "abcd");
        assert_eq!(strip_one_newline("abcd\n\n".into()), "abcd\n");
        assert_eq!(strip_one_newline("abcd".into()), "abcd");
    }
}
