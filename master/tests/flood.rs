//! A webhook flood cannot starve builds: the real `rbb master` and `rbb-worker` on loopback,
//! a few thousand signed webhook deliveries from several threads, and a forced build's
//! trigger → first instruction measured without and during the flood.

mod support;

use hmac::{Hmac, Mac};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;

const SECRET: &str = "flood-secret";

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn a_webhook_flood_gets_429s_and_does_not_starve_a_forced_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("started-at");
    make_repo(
        &dir.path().join("app"),
        &format!("builders:\n  stamp:\n    steps:\n      - run: date +%s%N > {}\n", marker.display()),
        &[],
    );
    let config = write_config(dir.path(), &["app"], &[("w1", "secret", &[])]);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!("api_token: tok\nwebhooks:\n  github_secret: {SECRET}\n"));
    std::fs::write(&config, text).expect("config");
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "secret", &dir.path().join("w1"), &[]);
    // The first build clones the checkout: not part of either figure.
    let _ = trigger_to_first_instruction_with_token(&m, &marker);

    let quiet: Vec<f64> = (0..5).map(|_| trigger_to_first_instruction_with_token(&m, &marker)).collect();

    let body = std::fs::read(root().join("testdata/webhooks/github/push.json")).expect("payload");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&body);
    let signature =
        format!("sha256={}", mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>());
    let body = String::from_utf8(body).expect("utf8");
    let (limited, passed, sent) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (addr, body, signature) = (m.http.clone(), body.clone(), signature.clone());
            let (limited, passed, sent) = (limited.clone(), passed.clone(), sent.clone());
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    let r = http(
                        &addr,
                        "POST",
                        "/api/v2/hooks/github",
                        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &signature)],
                        Some(&body),
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                    match r.status {
                        429 => {
                            assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
                            limited.fetch_add(1, Ordering::Relaxed);
                        }
                        200 | 202 => {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("a webhook answered {other}: {}", r.text()),
                    }
                }
            })
        })
        .collect();
    // Measure while the flood is on (4 × 1,000 deliveries, each on its own connection).
    wait_for(Duration::from_secs(30), "the flood to start", || (sent.load(Ordering::Relaxed) > 200).then_some(()));
    let mut during = Vec::new();
    for _ in 0..5 {
        during.push(trigger_to_first_instruction_with_token(&m, &marker));
    }
    let sent_while_measuring = sent.load(Ordering::Relaxed);
    for t in threads {
        t.join().expect("flood thread");
    }
    let (q, d) = (median(quiet), median(during));
    eprintln!(
        "trigger → first instruction: {q:.1} ms quiet, {d:.1} ms during a flood of {} webhook deliveries ({} answered 429, {} passed)",
        sent.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        passed.load(Ordering::Relaxed)
    );
    assert!(sent_while_measuring > 400, "the flood was still on while the builds ran ({sent_while_measuring} sent)");
    assert!(limited.load(Ordering::Relaxed) > passed.load(Ordering::Relaxed), "most of the flood is limited");
    assert!(passed.load(Ordering::Relaxed) >= 100, "the burst passes");
    assert!(
        d < 2000.0,
        "a forced build waited {d:.0} ms for its first instruction during the flood (quiet: {q:.0} ms)"
    );
}

/// Forces `app/stamp` (with the master's admin token) and returns the milliseconds from the
/// request to its step's first instruction (the step writes the time it starts).
fn trigger_to_first_instruction_with_token(m: &Master, marker: &Path) -> f64 {
    let _ = std::fs::remove_file(marker);
    let before = now_ns();
    let r = http(&m.http, "POST", "/api/v2/builders/app%2Fstamp/force", &[("Authorization", "Bearer tok")], Some("{}"));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["build"].as_u64().expect("id");
    let b = m.finished(id, Duration::from_secs(60));
    assert_eq!(b["result"], "SUCCESS", "{b}");
    let stamp: u128 = std::fs::read_to_string(marker).expect("stamp").trim().parse().expect("ns");
    stamp.saturating_sub(before) as f64 / 1e6
}
