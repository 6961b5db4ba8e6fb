//! Secrets end to end: the real `rbb master` and `rbb-worker` on loopback, a real git
//! repository. A step gets its secret (it writes the value's sha256 where the test reads it),
//! and the value, in clear, split across a 1 MiB chunk boundary, base64'd or URL-encoded, is
//! in no log, no API answer, no file of the state directory and no process log. Pull
//! requests from forks get no secrets. Config mistakes stop the master with the secret's name.

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(90);

/// Has `/` and `+`, so its URL encoding differs from it.
const VALUE: &str = "rbb-Secret/Value+9f3Zq7";

/// Every form of [`VALUE`] that must never leave the worker.
fn forms() -> Vec<(String, Vec<u8>)> {
    vec![
        ("clear".to_owned(), VALUE.as_bytes().to_vec()),
        ("base64".to_owned(), STANDARD.encode(VALUE).into_bytes()),
        ("base64url".to_owned(), URL_SAFE_NO_PAD.encode(VALUE).into_bytes()),
        ("url-encoded".to_owned(), VALUE.replace('/', "%2F").replace('+', "%2B").into_bytes()),
    ]
}

fn assert_clean(what: &str, bytes: &[u8]) {
    for (form, needle) in forms() {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the secret ({form}) is in {what}:\n{}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(4000)])
        );
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn pipeline(out: &Path) -> String {
    format!(
        r#"
builders:
  deploy:
    env:
      TOKEN: ${{{{ secrets.DEPLOY_TOKEN }}}}
    steps:
      - name: use
        run: |
          printf %s "$TOKEN" | sha256sum | cut -d' ' -f1 > {out}/token.sha256
          printf %s "$AUTH" | sha256sum | cut -d' ' -f1 > {out}/auth.sha256
          echo "plain: $TOKEN"
          echo "stderr: $TOKEN" >&2
          printf %s "$TOKEN" | base64
          printf 'x%s' "$TOKEN" | base64
          printf 'xy%s' "$TOKEN" | base64
          printf %s "$TOKEN" | base64 | tr '+/' '-_' | tr -d '='
          echo "url: $(printf %s "$TOKEN" | sed 's|/|%2F|g; s|+|%2B|g')"
          echo "plain env: $PLAIN"
        env:
          AUTH: "Bearer ${{{{ secrets.DEPLOY_TOKEN }}}}!"
          PLAIN: visible
      - name: split
        run: head -c 1048570 /dev/zero | tr '\0' a; printf %s "$TOKEN"; printf 'b%.0s' $(seq 1 100); echo
      - name: none
        run: echo "token here is [$TOKEN]"
        env:
          TOKEN: not-a-secret
"#,
        out = out.display()
    )
}

#[test]
fn a_step_gets_its_secret_and_nothing_outside_the_worker_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    make_repo(&dir.path().join("app"), &pipeline(&out), &[("README.md", "readme\n")]);
    std::fs::write(dir.path().join("deploy-token"), format!("{VALUE}\n")).expect("secret file");
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[])]);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("secrets:\n  DEPLOY_TOKEN:\n    file: deploy-token\n    version: 3\n");
    std::fs::write(&config, text).expect("config");
    let state = dir.path().join("state");

    let mut m = Master::start(&config, &state);
    let mut w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let id = m.force("app/deploy");
    let b = m.finished(id, T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");

    // The step had the value, whole and embedded.
    let sha = |s: &str| Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let read = |f: &str| std::fs::read_to_string(out.join(f)).expect("the step wrote its file").trim().to_owned();
    assert_eq!(read("token.sha256"), sha(VALUE));
    assert_eq!(read("auth.sha256"), sha(&format!("Bearer {VALUE}!")));

    // Its logs have `***` where the value was, in every form.
    let steps = b["steps"].as_array().expect("steps").clone();
    let log = |name: &str| {
        let s = steps.iter().find(|s| s["name"] == name).expect("step");
        let r = m.get(&format!("/api/v2/logs/{}/raw", s["log_id"].as_u64().expect("log id")));
        assert_eq!(r.status, 200);
        r.body
    };
    let used = String::from_utf8(log("use")).expect("utf8");
    assert_clean("the log of `use`", used.as_bytes());
    assert!(used.contains("plain: ***\n") && used.contains("stderr: ***\n"), "{used}");
    assert!(used.contains("url: ***\n"), "{used}");
    assert!(used.contains("plain env: visible"), "{used}");
    let lines: Vec<&str> = used.lines().collect();
    let base64_lines = lines.iter().filter(|l| l.contains("***") && !l.contains(':')).count();
    assert_eq!(base64_lines, 4, "each base64 line is masked: {used}");
    let split = log("split");
    assert_clean("the log of `split`", &split);
    // Nothing around it is lost: the 1048570 `a`s, the mask, the 100 `b`s.
    let at = split.windows(3).position(|w| w == b"***").expect("the mask");
    let run = split[..at].iter().rev().take_while(|c| **c == b'a').count();
    assert_eq!(run, 1048570);
    assert!(split[at + 3..].starts_with(format!("{}\n", "b".repeat(100)).as_bytes()));
    assert!(String::from_utf8_lossy(&log("none")).contains("token here is [not-a-secret]"));

    // No API answer holds it; the plan names the secret, not its value.
    let mut paths = vec![
        "/api/v2/builds".to_owned(),
        format!("/api/v2/builds/{id}"),
        format!("/api/v2/builds/{id}/steps"),
        "/api/v2/plan".to_owned(),
        "/api/v2/builders".to_owned(),
        "/api/v2/builders/app%2Fdeploy".to_owned(),
        "/api/v2/changes".to_owned(),
        "/api/v2/workers".to_owned(),
        "/api/v2/grid".to_owned(),
        "/api/v2/repositories".to_owned(),
        "/api/v2/cache".to_owned(),
    ];
    for s in &steps {
        let log = s["log_id"].as_u64().expect("log id");
        paths.push(format!("/api/v2/logs/{log}"));
        paths.push(format!("/api/v2/logs/{log}/raw"));
        paths.push(format!("/api/v2/logs/{log}/streams"));
    }
    for p in &paths {
        let r = m.get(p);
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        assert_clean(p, &r.body);
    }
    let plan = m.get("/api/v2/plan").json();
    let use_step = &plan["builders"][0]["steps"][0];
    assert_eq!(use_step["secrets"]["TOKEN"], serde_json::json!(["DEPLOY_TOKEN"]), "{use_step:#}");
    assert_eq!(use_step["env"]["AUTH"], "Bearer ${{ secrets.DEPLOY_TOKEN }}!");

    // Nor any file of the state directory (redb, logs, mirrors), nor the processes' own logs.
    m.kill();
    w.kill9();
    let mut files = Vec::new();
    files_under(&state, &mut files);
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "redb")), "{files:?}");
    for f in &files {
        assert_clean(&f.display().to_string(), &std::fs::read(f).expect("read state file"));
    }
    assert_clean("the master's log", m.log_text().as_bytes());
    assert_clean("the worker's log", w.log_text().as_bytes());
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn pull_requests_from_forks_get_no_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("app");
    let pipeline = r#"
builders:
  check:
    on:
      pull_request: { branches: [main] }
    steps:
      - name: test
        run: echo testing
      - name: publish
        run: test -n "$TOKEN" && echo "published with $TOKEN"
        env:
          TOKEN: ${{ secrets.DEPLOY_TOKEN }}
"#;
    make_repo(&repo, pipeline, &[("README.md", "readme\n")]);
    std::fs::write(dir.path().join("deploy-token"), VALUE).expect("secret file");
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    token: t\nwebhooks:\n  github_secret: gh\nsecrets:\n  DEPLOY_TOKEN: { file: deploy-token }\n",
    )
    .expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let sample = root().join("testdata/webhooks/github/pull_request_opened.json");
    let sample: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sample).expect("payload")).expect("json");
    let run_pr = |number: u64, minute: u32, head_repo: &str| {
        git(&repo, &["checkout", "-q", "-b", &format!("pr-{number}")]);
        let head = commit(&repo, "src/pr.c", &format!("{number}\n"), minute, "PR work");
        git(&repo, &["checkout", "-q", "main"]);
        git(&repo, &["update-ref", &format!("refs/pull/{number}/head"), &head]);
        let mut v = sample.clone();
        v["number"] = number.into();
        v["pull_request"]["number"] = number.into();
        v["pull_request"]["head"]["sha"] = head.clone().into();
        v["pull_request"]["head"]["repo"]["clone_url"] = head_repo.into();
        let body = v.to_string();
        let sig = format!("sha256={}", sign("gh", body.as_bytes()));
        let r = http(
            &m.http,
            "POST",
            "/api/v2/hooks/github",
            &[("X-GitHub-Event", "pull_request"), ("X-Hub-Signature-256", &sig)],
            Some(&body),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let b = wait_for(T, "the pull request's build", || {
            builds(&m).into_iter().find(|b| b["builder"] == "app/check" && b["commit"] == head.as_str())
        });
        m.finished(b["id"].as_u64().expect("id"), T)
    };

    // From a fork: the step that needs the secret is skipped, and says why.
    let fork = run_pr(7, 5, "https://github.com/jdoe/app.git");
    assert_eq!(fork["result"], "SUCCESS", "{fork:#}");
    let steps = fork["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["result"], "SUCCESS");
    assert_eq!(steps[1]["result"], "SKIPPED", "{fork:#}");
    assert_eq!(steps[1]["reason"], "secrets are not given to pull requests from forks");

    // From a branch of the repository itself: it runs with the secret.
    let own = run_pr(8, 6, "https://github.com/acme/app.git");
    assert_eq!(own["result"], "SUCCESS", "{own:#}");
    let steps = own["steps"].as_array().expect("steps");
    assert_eq!(steps[1]["result"], "SUCCESS", "{own:#}");
    let log = m.get(&format!("/api/v2/logs/{}/raw", steps[1]["log_id"].as_u64().expect("log"))).text();
    assert!(log.contains("published with ***"), "{log}");
}

/// Runs `rbb master` on `config` and returns its exit status and stderr.
fn master_fails(config: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rbb"));
    cmd.args(["master", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--config"]).arg(config);
    cmd.arg("--state-dir").arg(config.with_file_name("state"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run rbb master");
    assert!(!out.status.success(), "the master started with {}", std::fs::read_to_string(config).unwrap_or_default());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_mistakes_name_the_secret_and_never_show_a_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: 'true' }]\n", &[]);
    let config = dir.path().join("rbb.yaml");
    let write = |secrets: &str| {
        std::fs::write(&config, format!("repositories:\n  - url: app\nsecrets:\n{secrets}")).expect("config")
    };

    write("  DEPLOY_TOKEN: { file: missing-file }\n");
    let err = master_fails(&config, &[]);
    assert!(err.contains("secret `DEPLOY_TOKEN`") && err.contains("missing-file"), "{err}");

    write("  NPM: { env: RBB_TEST_NPM_TOKEN }\n");
    let err = master_fails(&config, &[]);
    assert!(err.contains("secret `NPM`") && err.contains("RBB_TEST_NPM_TOKEN is not set"), "{err}");

    write("  NPM: { env: RBB_TEST_NPM_TOKEN }\n");
    let err = master_fails(&config, &[("RBB_TEST_NPM_TOKEN", "abc")]);
    assert!(err.contains("secret `NPM`") && err.contains("at least 4 bytes"), "{err}");
    assert!(!err.contains("abc"), "{err}");

    // Written inline: refused with a hint, the value never repeated.
    write(&format!("  DEPLOY_TOKEN: {VALUE}\n"));
    let err = master_fails(&config, &[]);
    assert!(err.contains("secret `DEPLOY_TOKEN` is written in the master config"), "{err}");
    assert!(err.contains("rbb.yaml:4:17") && err.contains("file: /etc/rbb/deploy_token"), "{err}");
    assert_clean("the master's error", err.as_bytes());
    write(&format!("  DEPLOY_TOKEN: {{ value: {VALUE} }}\n"));
    let err = master_fails(&config, &[]);
    assert!(err.contains("is written in the master config"), "{err}");
    assert_clean("the master's error", err.as_bytes());

    write("  DEPLOY_TOKEN: { file: a, env: B }\n  bad-name: { env: X }\n  LIB: { env: X, repositories: [nope] }\n");
    let err = master_fails(&config, &[]);
    assert!(err.contains("sets both `file` and `env`"), "{err}");
    assert!(err.contains("`bad-name` is not a valid secret name"), "{err}");
    assert!(err.contains("repository `nope`, which the master config does not list"), "{err}");
}

#[test]
fn a_container_step_gets_its_secret_and_its_output_is_masked() {
    let script = root().join("testdata/docker/build-images.sh");
    let out = std::process::Command::new("sh").arg(&script).output().expect("run build-images.sh");
    assert!(
        out.status.success(),
        "this test needs the Docker engine and the test images; {} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = r#"
builders:
  deploy:
    image: rbb-test/busybox:1
    steps:
      - name: use
        run: |
          printf %s "$TOKEN" | sha256sum | cut -d' ' -f1 > token.sha256
          echo "in a container: $TOKEN"
          printf %s "$TOKEN" | base64
        env:
          TOKEN: ${{ secrets.DEPLOY_TOKEN }}
      - name: after
        run: 'echo "after: ${TOKEN:-unset}"'
"#;
    make_repo(&dir.path().join("app"), pipeline, &[("README.md", "readme\n")]);
    std::fs::write(dir.path().join("deploy-token"), VALUE).expect("secret file");
    let config = write_config(dir.path(), &["app"], &[("secrets-docker", "t", &[])]);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("secrets:\n  DEPLOY_TOKEN: { file: deploy-token }\n");
    std::fs::write(&config, text).expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let work = dir.path().join("secrets-docker");
    let w = Worker::start(&m, "secrets-docker", "t", &work, &[("RBB_WORKER_DOCKER", "true")]);
    let b = m.finished(m.force("app/deploy"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let mut files = Vec::new();
    files_under(&work, &mut files);
    let sha_file = files.iter().find(|f| f.ends_with("token.sha256")).expect("the step wrote token.sha256");
    let want: String = Sha256::digest(VALUE.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(std::fs::read_to_string(sha_file).expect("read").trim(), want);
    let log = |i: usize| {
        let id = b["steps"][i]["log_id"].as_u64().expect("log id");
        m.get(&format!("/api/v2/logs/{id}/raw")).body
    };
    let used = log(0);
    assert_clean("the container step's log", &used);
    let used = String::from_utf8_lossy(&used);
    assert!(used.contains("in a container: ***\n") && used.contains("\n***\n"), "{used}");
    assert!(String::from_utf8_lossy(&log(1)).contains("after: unset"));
    assert_clean("the worker's log", w.log_text().as_bytes());
}
