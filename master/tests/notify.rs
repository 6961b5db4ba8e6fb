//! Notifications of finished builds: rule filters, the signed outgoing webhook (JSON and
//! Slack text) against a local HTTP server, and e-mail to a real SMTP server on loopback
//! (aiosmtpd, writing what it receives to a maildir the test reads).

use std::io::Read;
mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rbb_master::forge::notify::{self, Finished, SIGNATURE_HEADER};
use rbb_master::forge::sender::{CurlTransport, Transport};
use rbb_master::model::BuildRecord;
use rbb_schema::config::{EmailConfig, NotificationConfig, NotifyFormat, NotifyWhen, SmtpTls};
use rbb_schema::results::Outcome;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn build(builder: &str, result: Outcome) -> BuildRecord {
    serde_json::from_value(serde_json::json!({
        "id": 42, "builder": builder, "repo": "app", "repo_url": "/srv/app", "branch": "main",
        "commit": SHA, "plan_hash": "sha256:x", "pipeline_blob": null, "reason": "push", "event": "push",
        "properties": {}, "priority": 0, "state": "finished", "result": result, "result_reason": "step test failed",
        "worker": "w1", "waits_for": [], "halted": false, "cancelled": false, "attempt": 1,
        "checked_out": true, "changes": [3], "submitted_at": 0, "started_at": 1, "finished_at": 2, "steps": []
    }))
    .expect("a build record")
}

fn finished(b: &BuildRecord, previous: Option<Outcome>) -> Finished<'_> {
    Finished {
        build: b,
        previous,
        authors: vec![("Ada Lovelace".into(), "ada@example.test".into())],
        url: "http://rbb.test/#/builds/42".into(),
    }
}

#[test]
fn rules_filter_by_builder_failure_and_change() {
    let failing = build("app/test", Outcome::Failure);
    let passing = build("app/test", Outcome::Success);
    let cached = build("app/test", Outcome::Cached);
    let lint = build("app/lint", Outcome::Failure);
    let rule = |when, builders: &[&str]| NotificationConfig {
        when: Some(when),
        builders: builders.iter().map(|s| s.to_string()).collect(),
        ..NotificationConfig::default()
    };
    let wanted = |r: &NotificationConfig, f: &Finished<'_>| notify::wanted(r, f).expect("valid rule");
    let only_failures = rule(NotifyWhen::Failure, &[]);
    assert!(wanted(&only_failures, &finished(&failing, None)));
    assert!(!wanted(&only_failures, &finished(&passing, None)));
    assert!(!wanted(&only_failures, &finished(&cached, None)));
    let on_change = rule(NotifyWhen::Change, &[]);
    assert!(wanted(&on_change, &finished(&failing, Some(Outcome::Success))));
    assert!(!wanted(&on_change, &finished(&failing, Some(Outcome::Failure))));
    assert!(wanted(&on_change, &finished(&passing, None)), "a first build is a change");
    let tests_only = rule(NotifyWhen::Always, &["app/test*"]);
    assert!(wanted(&tests_only, &finished(&failing, None)));
    assert!(!wanted(&tests_only, &finished(&lint, None)));
    assert!(notify::wanted(&rule(NotifyWhen::Always, &["app/[x"]), &finished(&lint, None)).is_err());
}

/// Requests received: headers and body.
type Received = Arc<Mutex<Vec<(Vec<(String, String)>, String)>>>;

/// Records the requests it gets and answers 200.
fn receiver() -> (SocketAddr, Received, tokio::runtime::Runtime) {
    use axum::body::Body;
    use axum::http::Request;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Received = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let seen = s.clone();
        async move {
            let headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.expect("body");
            seen.lock().expect("seen").push((headers, String::from_utf8_lossy(&body).into_owned()));
            "ok"
        }
    });
    rt.spawn(async move { axum::serve(listener, app).await });
    (addr, seen, rt)
}

#[test]
fn the_webhook_is_signed_and_has_a_slack_variant() {
    let (addr, seen, _rt) = receiver();
    let b = build("app/test", Outcome::Failure);
    let f = finished(&b, Some(Outcome::Success));
    let secret = "hook-secret";
    for format in [NotifyFormat::Json, NotifyFormat::Slack] {
        let rule = NotificationConfig {
            webhook: Some(format!("http://{addr}/hook")),
            secret: Some(secret.into()),
            format: Some(format),
            ..NotificationConfig::default()
        };
        let req = notify::webhook_request(&rule, &f).expect("a webhook");
        let (code, _) = CurlTransport.post(&req, Duration::from_secs(5)).expect("posted");
        assert_eq!(code, 200);
    }
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 2);
    for (headers, body) in &seen {
        let sig = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(SIGNATURE_HEADER)).map(|(_, v)| v.clone());
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("hmac");
        mac.update(body.as_bytes());
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sig, Some(format!("sha256={hex}")), "the receiver can check the body: {body}");
    }
    let json: serde_json::Value = serde_json::from_str(&seen[0].1).expect("json");
    assert_eq!(json["event"], "build_finished");
    assert_eq!(json["build"]["result"], "FAILURE");
    assert_eq!(json["build"]["previous_result"], "SUCCESS");
    assert_eq!(json["authors"][0]["email"], "ada@example.test");
    let slack: serde_json::Value = serde_json::from_str(&seen[1].1).expect("json");
    let text = slack["text"].as_str().expect("text");
    assert!(text.contains("app/test FAILURE on main (0123456789)"), "{text}");
    assert!(text.contains("<http://rbb.test/#/builds/42|build 42>"), "{text}");
}

/// A real SMTP server on loopback: aiosmtpd with its Mailbox handler.
struct Smtp {
    child: Child,
    port: u16,
    maildir: std::path::PathBuf,
}

impl Smtp {
    fn start(dir: &Path) -> Smtp {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let maildir = dir.join("maildir");
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd; .ci/run does)");
        let mut smtp = Smtp { child, port, maildir };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = smtp.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = smtp.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("aiosmtpd exited with {status}: {err}\n(pip install aiosmtpd; .ci/run does)");
            }
            assert!(started.elapsed() < Duration::from_secs(20), "aiosmtpd did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        smtp
    }

    fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else { return Vec::new() };
        entries.flatten().filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_failing_build_mails_the_authors_of_its_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let smtp = Smtp::start(tmp.path());
    let email = EmailConfig {
        server: "127.0.0.1".into(),
        port: Some(smtp.port),
        tls: Some(SmtpTls::None),
        from: "rbb <ci@example.test>".into(),
        to: vec!["team@example.test".into()],
        ..EmailConfig::default()
    };
    let b = build("app/test", Outcome::Failure);
    let f = finished(&b, Some(Outcome::Success));
    let message = notify::email_message(&email, &f).expect("message").expect("has recipients");
    notify::send_email(&email, &message, Duration::from_secs(10)).expect("sent");
    let mail = {
        let started = Instant::now();
        loop {
            if let Some(m) = smtp.messages().into_iter().next() {
                break m;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no mail arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(mail.contains("Subject: [rbb] app/test FAILURE on main (0123456789)"), "{mail}");
    assert!(mail.contains("ada@example.test") && mail.contains("team@example.test"), "{mail}");
    assert!(mail.contains("http://rbb.test/#/builds/42"), "{mail}");
    assert!(mail.contains("Previous: SUCCESS"), "{mail}");

    // Nobody to write to: no message.
    let nobody = EmailConfig { to: vec![], to_authors: Some(false), ..email.clone() };
    assert!(notify::email_message(&nobody, &f).expect("message").is_none());
    // A server that is not there: an error naming it.
    let gone = EmailConfig { port: Some(1), ..email };
    let err = notify::send_email(&gone, &message, Duration::from_secs(5)).expect_err("no server");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
}

#[test]
fn a_real_master_posts_a_notification_when_a_build_finishes() {
    let (addr, seen, _rt) = receiver();
    let dir = tempfile::tempdir().expect("tempdir");
    support::make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: 'exit 3' }]\n", &[]);
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    token: t\nnotifications:\n  - webhook: http://{addr}/hook\n    when: failure\n"
        ),
    )
    .expect("config");
    let m = support::Master::start(&config, &dir.path().join("state"));
    let _w = support::Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let id = m.force("app/b");
    assert_eq!(m.finished(id, Duration::from_secs(60))["result"], "FAILURE");
    let body = support::wait_for(Duration::from_secs(30), "the notification", || {
        seen.lock().expect("seen").first().map(|(_, b)| b.clone())
    });
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["build"]["id"], id);
    assert_eq!(json["build"]["result"], "FAILURE");
    // One finished build, one notification, whatever events followed.
    let id2 = m.force("app/b");
    m.finished(id2, Duration::from_secs(60));
    support::wait_for(Duration::from_secs(30), "the second notification", || {
        (seen.lock().expect("seen").len() >= 2).then_some(())
    });
    assert_eq!(seen.lock().expect("seen").len(), 2);
}
