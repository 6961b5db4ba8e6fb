//! Forge webhooks: signature checks and payload parsing against the sample payloads in
//! `testdata/webhooks/` (see its README for the secret they are signed with). Test helpers
//! may unwrap like the tests themselves.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use hmac::{Hmac, Mac};
use proptest::prelude::*;
use rbb_master::webhooks::{
    Event, Forge, ParseError, PullRequest, Push, RepoRef, VerifyError, header_lookup, parse, verify,
};
use sha2::Sha256;

const SECRET: &str = "rbb-webhook-test-secret";

const SAMPLES: &[(Forge, &str, &str)] = &[
    (Forge::GitHub, "github/push.json", "push"),
    (Forge::GitHub, "github/push_new_branch.json", "push"),
    (Forge::GitHub, "github/push_delete_branch.json", "push"),
    (Forge::GitHub, "github/pull_request_opened.json", "pull_request"),
    (Forge::GitHub, "github/pull_request_synchronize.json", "pull_request"),
    (Forge::GitHub, "github/ping.json", "ping"),
    (Forge::GitLab, "gitlab/push.json", "Push Hook"),
    (Forge::GitLab, "gitlab/tag_push.json", "Tag Push Hook"),
    (Forge::GitLab, "gitlab/merge_request_open.json", "Merge Request Hook"),
    (Forge::Gitea, "gitea/push.json", "push"),
    (Forge::Gitea, "gitea/pull_request_opened.json", "pull_request"),
];

fn sample(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/webhooks").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The headers the forge sends with `body` signed with `secret`.
fn signed(forge: Forge, secret: &str, body: &[u8]) -> Vec<(String, String)> {
    match forge {
        Forge::GitHub => headers(&[("X-Hub-Signature-256", &format!("sha256={}", hmac_hex(secret, body)))]),
        Forge::Gitea => headers(&[("X-Gitea-Signature", &hmac_hex(secret, body))]),
        Forge::GitLab => headers(&[("X-Gitlab-Token", secret)]),
    }
}

fn event_header(forge: Forge) -> &'static str {
    match forge {
        Forge::GitHub => "X-GitHub-Event",
        Forge::GitLab => "X-Gitlab-Event",
        Forge::Gitea => "X-Gitea-Event",
    }
}

fn parse_sample(forge: Forge, name: &str, kind: &str) -> Event {
    let h = headers(&[(event_header(forge), kind)]);
    parse(forge, header_lookup(&h), &sample(name)).unwrap_or_else(|e| panic!("parsing {name}: {e} ({e:?})"))
}

fn push(event: Event) -> Push {
    match event {
        Event::Push(p) => p,
        other => panic!("expected a push, got {other:?}"),
    }
}

fn pull_request(event: Event) -> PullRequest {
    match event {
        Event::PullRequest(pr) => pr,
        other => panic!("expected a pull request, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------ verify

#[test]
fn forge_from_path() {
    assert_eq!(Forge::from_path("github"), Some(Forge::GitHub));
    assert_eq!(Forge::from_path("gitlab"), Some(Forge::GitLab));
    assert_eq!(Forge::from_path("gitea"), Some(Forge::Gitea));
    assert_eq!(Forge::from_path("forgejo"), Some(Forge::Gitea));
    assert_eq!(Forge::from_path("GitHub"), Some(Forge::GitHub));
    assert_eq!(Forge::from_path("bitbucket"), None);
    assert_eq!(Forge::from_path(""), None);
}

/// The example in GitHub's "Validating webhook deliveries" documentation.
#[test]
fn github_documented_signature_verifies() {
    let h =
        headers(&[("X-Hub-Signature-256", "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")]);
    assert_eq!(verify(Forge::GitHub, header_lookup(&h), b"Hello, World!", "It's a Secret to Everybody"), Ok(()));
}

#[test]
fn correctly_signed_samples_verify() {
    for &(forge, name, _) in SAMPLES {
        let body = sample(name);
        let h = signed(forge, SECRET, &body);
        assert_eq!(verify(forge, header_lookup(&h), &body, SECRET), Ok(()), "{name}");
    }
}

#[test]
fn header_names_are_case_insensitive() {
    let body = sample("github/push.json");
    let sig = format!("sha256={}", hmac_hex(SECRET, &body));
    let h = headers(&[("x-hub-signature-256", &sig)]);
    assert_eq!(verify(Forge::GitHub, header_lookup(&h), &body, SECRET), Ok(()));
    // A lookup that only knows lower-case names (like a lower-cased map) works too.
    let lower_only = |name: &str| (name == "x-hub-signature-256").then(|| sig.clone());
    assert_eq!(verify(Forge::GitHub, lower_only, &body, SECRET), Ok(()));
}

#[test]
fn forgejo_signature_header_verifies() {
    let body = sample("gitea/push.json");
    let h = headers(&[("X-Forgejo-Signature", &hmac_hex(SECRET, &body))]);
    assert_eq!(verify(Forge::Gitea, header_lookup(&h), &body, SECRET), Ok(()));
    // Forgejo sends both; a wrong X-Forgejo-Signature is not rescued by X-Gitea-Signature.
    let h =
        headers(&[("X-Forgejo-Signature", &hmac_hex("other", &body)), ("X-Gitea-Signature", &hmac_hex(SECRET, &body))]);
    assert_eq!(
        verify(Forge::Gitea, header_lookup(&h), &body, SECRET),
        Err(VerifyError::Mismatch { header: "X-Forgejo-Signature" })
    );
}

#[test]
fn wrong_secret_is_a_mismatch() {
    for (forge, name, header) in [
        (Forge::GitHub, "github/push.json", "X-Hub-Signature-256"),
        (Forge::GitLab, "gitlab/push.json", "X-Gitlab-Token"),
        (Forge::Gitea, "gitea/push.json", "X-Gitea-Signature"),
    ] {
        let body = sample(name);
        let h = signed(forge, "not-the-secret", &body);
        assert_eq!(verify(forge, header_lookup(&h), &body, SECRET), Err(VerifyError::Mismatch { header }), "{name}");
    }
    // A GitLab token that is a prefix or an extension of the secret does not pass either.
    for token in ["rbb-webhook-test", "rbb-webhook-test-secret2", ""] {
        let h = headers(&[("X-Gitlab-Token", token)]);
        assert!(verify(Forge::GitLab, header_lookup(&h), b"{}", SECRET).is_err(), "{token:?}");
    }
}

#[test]
fn missing_header_is_missing() {
    let nothing: Vec<(String, String)> = Vec::new();
    for (forge, header) in
        [(Forge::GitHub, "X-Hub-Signature-256"), (Forge::GitLab, "X-Gitlab-Token"), (Forge::Gitea, "X-Gitea-Signature")]
    {
        assert_eq!(
            verify(forge, header_lookup(&nothing), b"{}", SECRET),
            Err(VerifyError::Missing { header }),
            "{forge}"
        );
    }
    // GitHub's legacy SHA-1 header alone is not enough.
    let h = headers(&[("X-Hub-Signature", "sha1=0123456789abcdef0123456789abcdef01234567")]);
    assert_eq!(
        verify(Forge::GitHub, header_lookup(&h), b"{}", SECRET),
        Err(VerifyError::Missing { header: "X-Hub-Signature-256" })
    );
    // Gitea sends an empty signature when its webhook has no secret.
    let h = headers(&[("X-Gitea-Signature", "")]);
    assert_eq!(
        verify(Forge::Gitea, header_lookup(&h), b"{}", SECRET),
        Err(VerifyError::Missing { header: "X-Gitea-Signature" })
    );
}

#[test]
fn malformed_signature_header_is_malformed() {
    let body = sample("github/push.json");
    let good = hmac_hex(SECRET, &body);
    let github_cases = [
        good.clone(),                        // no prefix
        format!("sha1={good}"),              // wrong prefix
        format!("sha256={}", &good[..40]),   // too short
        format!("sha256={good}00"),          // too long
        format!("sha256={}zz", &good[..62]), // not hex
        format!("sha256={}é", &good[..62]),  // not ASCII
    ];
    for value in github_cases {
        let h = headers(&[("X-Hub-Signature-256", &value)]);
        let got = verify(Forge::GitHub, header_lookup(&h), &body, SECRET);
        assert!(matches!(got, Err(VerifyError::Malformed { header: "X-Hub-Signature-256", .. })), "{value}: {got:?}");
    }
    let gitea_cases = [format!("sha256={good}"), "xyz".to_string(), good[..63].to_string()];
    for value in gitea_cases {
        let h = headers(&[("X-Gitea-Signature", &value)]);
        let got = verify(Forge::Gitea, header_lookup(&h), &body, SECRET);
        assert!(matches!(got, Err(VerifyError::Malformed { header: "X-Gitea-Signature", .. })), "{value}: {got:?}");
    }
    // Upper-case hex is still hex.
    let h = headers(&[("X-Gitea-Signature", &good.to_uppercase())]);
    assert_eq!(verify(Forge::Gitea, header_lookup(&h), &body, SECRET), Ok(()));
}

#[test]
fn body_tampered_after_signing_is_a_mismatch() {
    for (forge, name, header) in [
        (Forge::GitHub, "github/push.json", "X-Hub-Signature-256"),
        (Forge::Gitea, "gitea/push.json", "X-Gitea-Signature"),
    ] {
        let body = sample(name);
        let h = signed(forge, SECRET, &body);
        let tampered = String::from_utf8(body).unwrap().replace("refs/heads/main", "refs/heads/prod").into_bytes();
        assert_eq!(
            verify(forge, header_lookup(&h), &tampered, SECRET),
            Err(VerifyError::Mismatch { header }),
            "{name}"
        );
    }
    // GitLab's token does not sign the body, so a tampered body still carries a valid
    // token: the token only proves the sender knows the secret.
    let body = sample("gitlab/push.json");
    let h = signed(Forge::GitLab, SECRET, &body);
    assert_eq!(verify(Forge::GitLab, header_lookup(&h), b"{\"other\":1}", SECRET), Ok(()));
}

// ------------------------------------------------------------------------------- parse

fn assert_github_acme_app(repo: &RepoRef) {
    assert_eq!(repo.full_name, "acme/app");
    assert_eq!(repo.name, "app");
    assert!(repo.matches("https://github.com/acme/app.git", "app"), "{repo:?}");
}

#[test]
fn github_push() {
    let p = push(parse_sample(Forge::GitHub, "github/push.json", "push"));
    assert_github_acme_app(&p.repo);
    assert_eq!(
        p.repo.urls,
        [
            "https://github.com/acme/app.git",
            "git@github.com:acme/app.git",
            "https://github.com/acme/app",
            "git://github.com/acme/app.git",
        ]
    );
    assert_eq!(p.branch.as_deref(), Some("main"));
    assert_eq!(p.tag, None);
    assert_eq!(p.before.as_deref(), Some("9c1f7a3e5b2d4c6a8e0f1b3d5c7e9a1b2c4d6e8f"));
    assert_eq!(p.after.as_deref(), Some("e4b8c2d6f0a1935b7d2c8e6f4a0b1c3d5e7f9a2b"));
    assert_eq!(p.pusher.as_deref(), Some("jdoe"));
    assert_eq!(p.commits.len(), 2);
    let first = &p.commits[0];
    assert_eq!(first.id, "3a7d2f1c9e8b4a6d5c0f2e1b7a9d8c6e4f3b2a10");
    assert!(first.message.starts_with("Add retry to the fetch step\n\n"));
    assert_eq!(first.author, "Jane Doe");
    assert_eq!(first.email, "jane.doe@example.com");
    assert_eq!(first.timestamp.as_deref(), Some("2025-03-11T10:55:02+01:00"));
    assert_eq!(first.files, ["src/retry.rs", "src/lib.rs", "Cargo.toml"]);
    assert_eq!(p.commits[1].id, "e4b8c2d6f0a1935b7d2c8e6f4a0b1c3d5e7f9a2b");
    assert_eq!(p.commits[1].files, ["README.md", "docs/old.md"]);
}

#[test]
fn github_push_new_branch_has_no_before() {
    let p = push(parse_sample(Forge::GitHub, "github/push_new_branch.json", "push"));
    assert_eq!(p.branch.as_deref(), Some("feature/login"));
    assert_eq!(p.before, None);
    assert_eq!(p.after.as_deref(), Some("5d1e9b7c3a2f4e6d8c0b1a3f5e7d9c2b4a6f8e01"));
    assert_eq!(p.commits.len(), 1);
    assert_eq!(p.commits[0].files, ["src/login.rs", "templates/login.html", "src/main.rs"]);
}

#[test]
fn github_push_delete_branch_has_no_after() {
    let p = push(parse_sample(Forge::GitHub, "github/push_delete_branch.json", "push"));
    assert_eq!(p.branch.as_deref(), Some("feature/old-ui"));
    assert_eq!(p.before.as_deref(), Some("7f3b9d1e5c2a4f6b8d0e2c4a6f8b1d3e5c7a9f02"));
    assert_eq!(p.after, None);
    assert!(p.commits.is_empty());
}

#[test]
fn github_pull_request_opened() {
    let pr = pull_request(parse_sample(Forge::GitHub, "github/pull_request_opened.json", "pull_request"));
    assert_github_acme_app(&pr.repo);
    assert_eq!(pr.action, "opened");
    assert_eq!(pr.number, 42);
    assert_eq!(pr.title, "Add a login form");
    assert_eq!(pr.target_branch, "main");
    assert_eq!(pr.source_branch, "feature/login");
    assert_eq!(pr.head_sha, "5d1e9b7c3a2f4e6d8c0b1a3f5e7d9c2b4a6f8e01");
    assert_eq!(pr.head_repo_url.as_deref(), Some("https://github.com/jdoe/app.git"));
    assert_eq!(pr.author.as_deref(), Some("jdoe"));
}

#[test]
fn github_pull_request_synchronize() {
    let pr = pull_request(parse_sample(Forge::GitHub, "github/pull_request_synchronize.json", "pull_request"));
    assert_eq!(pr.action, "synchronize");
    assert_eq!(pr.number, 42);
    assert_eq!(pr.head_sha, "a9c7e5b3d1f9a7c5e3b1d9f7a5c3e1b9d7f5a3c1");
}

#[test]
fn github_pull_request_other_actions_are_ignored() {
    let body = String::from_utf8(sample("github/pull_request_opened.json")).unwrap().replacen(
        "\"action\": \"opened\"",
        "\"action\": \"labeled\"",
        1,
    );
    let h = headers(&[("X-GitHub-Event", "pull_request")]);
    let got = parse(Forge::GitHub, header_lookup(&h), body.as_bytes()).unwrap();
    assert!(
        matches!(&got, Event::Ignored { kind, why } if kind == "pull_request" && why.contains("labeled")),
        "{got:?}"
    );
    // Closed (merged or not) is acted on.
    let body = body.replacen("\"action\": \"labeled\"", "\"action\": \"closed\"", 1);
    let pr = pull_request(parse(Forge::GitHub, header_lookup(&h), body.as_bytes()).unwrap());
    assert_eq!(pr.action, "closed");
}

#[test]
fn github_ping_and_other_events_are_ignored() {
    let got = parse_sample(Forge::GitHub, "github/ping.json", "ping");
    assert!(matches!(&got, Event::Ignored { kind, .. } if kind == "ping"), "{got:?}");
    let h = headers(&[("X-GitHub-Event", "issue_comment")]);
    let got = parse(Forge::GitHub, header_lookup(&h), b"{}").unwrap();
    assert!(matches!(&got, Event::Ignored { kind, .. } if kind == "issue_comment"), "{got:?}");
}

#[test]
fn push_to_other_refs_is_ignored() {
    let body = String::from_utf8(sample("github/push.json")).unwrap().replacen(
        "\"ref\": \"refs/heads/main\"",
        "\"ref\": \"refs/notes/commits\"",
        1,
    );
    let h = headers(&[("X-GitHub-Event", "push")]);
    let got = parse(Forge::GitHub, header_lookup(&h), body.as_bytes()).unwrap();
    assert!(matches!(&got, Event::Ignored { why, .. } if why.contains("refs/notes/commits")), "{got:?}");
}

#[test]
fn gitlab_push() {
    let p = push(parse_sample(Forge::GitLab, "gitlab/push.json", "Push Hook"));
    assert_eq!(p.repo.full_name, "acme/app");
    assert_eq!(p.repo.name, "app");
    assert_eq!(
        p.repo.urls,
        ["https://gitlab.com/acme/app.git", "git@gitlab.com:acme/app.git", "https://gitlab.com/acme/app",]
    );
    assert_eq!(p.branch.as_deref(), Some("main"));
    assert_eq!(p.before.as_deref(), Some("e4b8c2d6f0a1935b7d2c8e6f4a0b1c3d5e7f9a2b"));
    assert_eq!(p.after.as_deref(), Some("d8f0b2e4a6c8e0f2a4b6c8d0e2f4a6b8c0d2e415"));
    assert_eq!(p.pusher.as_deref(), Some("jdoe"));
    let ids: Vec<_> = p.commits.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["b6e2a4c8d0f1e3a5b7c9d1e3f5a7b9c1d3e5f702", "d8f0b2e4a6c8e0f2a4b6c8d0e2f4a6b8c0d2e415"]);
    assert_eq!(p.commits[1].files, [".rbb/cache.yml", "rbb.yml", "ci/old-cache.sh"]);
}

#[test]
fn gitlab_tag_push_uses_checkout_sha() {
    let p = push(parse_sample(Forge::GitLab, "gitlab/tag_push.json", "Tag Push Hook"));
    assert_eq!(p.tag.as_deref(), Some("v1.2.0"));
    assert_eq!(p.branch, None);
    assert_eq!(p.before, None);
    // The commit, not the annotated tag object in `after`.
    assert_eq!(p.after.as_deref(), Some("d8f0b2e4a6c8e0f2a4b6c8d0e2f4a6b8c0d2e415"));
    assert!(p.commits.is_empty());
}

#[test]
fn gitlab_deleted_branch_has_no_after() {
    let body = String::from_utf8(sample("gitlab/push.json")).unwrap();
    let body = body
        .replacen(
            "\"after\": \"d8f0b2e4a6c8e0f2a4b6c8d0e2f4a6b8c0d2e415\"",
            "\"after\": \"0000000000000000000000000000000000000000\"",
            1,
        )
        .replacen("\"checkout_sha\": \"d8f0b2e4a6c8e0f2a4b6c8d0e2f4a6b8c0d2e415\"", "\"checkout_sha\": null", 1);
    let h = headers(&[("X-Gitlab-Event", "Push Hook")]);
    let p = push(parse(Forge::GitLab, header_lookup(&h), body.as_bytes()).unwrap());
    assert_eq!(p.after, None);
}

#[test]
fn gitlab_merge_request_open() {
    let pr = pull_request(parse_sample(Forge::GitLab, "gitlab/merge_request_open.json", "Merge Request Hook"));
    assert_eq!(pr.repo.full_name, "acme/app");
    assert_eq!(pr.repo.name, "app");
    assert_eq!(pr.action, "opened");
    assert_eq!(pr.number, 7);
    assert_eq!(pr.title, "Add a login form");
    assert_eq!(pr.target_branch, "main");
    assert_eq!(pr.source_branch, "feature/login");
    assert_eq!(pr.head_sha, "f1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9");
    assert_eq!(pr.head_repo_url.as_deref(), Some("https://gitlab.com/jdoe/app.git"));
    assert_eq!(pr.author.as_deref(), Some("jdoe"));
}

#[test]
fn gitlab_merge_request_actions_are_normalised() {
    let body = String::from_utf8(sample("gitlab/merge_request_open.json")).unwrap();
    let h = headers(&[("X-Gitlab-Event", "Merge Request Hook")]);
    let with_action = |action: &str, oldrev: bool| {
        let mut b = body.replacen("\"action\": \"open\"", &format!("\"action\": \"{action}\""), 1);
        if oldrev {
            b = b.replacen("\"action\":", "\"oldrev\": \"5d1e9b7c3a2f4e6d8c0b1a3f5e7d9c2b4a6f8e01\", \"action\":", 1);
        }
        parse(Forge::GitLab, header_lookup(&h), b.as_bytes()).unwrap()
    };
    for (action, oldrev, want) in [
        ("reopen", false, "reopened"),
        ("close", false, "closed"),
        ("merge", false, "closed"),
        ("update", true, "synchronize"),
    ] {
        assert_eq!(pull_request(with_action(action, oldrev)).action, want, "{action}");
    }
    // An update without new commits (title, labels...) and approvals build nothing.
    for action in ["update", "approved"] {
        let got = with_action(action, false);
        assert!(matches!(got, Event::Ignored { .. }), "{action}: {got:?}");
    }
}

#[test]
fn gitea_push_lists_commits_oldest_first() {
    let p = push(parse_sample(Forge::Gitea, "gitea/push.json", "push"));
    assert_eq!(p.repo.full_name, "acme/app");
    assert_eq!(p.repo.name, "app");
    assert!(p.repo.urls.contains(&"https://gitea.example.com/acme/app.git".to_string()));
    assert!(p.repo.urls.contains(&"git@gitea.example.com:acme/app.git".to_string()));
    assert_eq!(p.branch.as_deref(), Some("main"));
    assert_eq!(p.before.as_deref(), Some("6e8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f47"));
    assert_eq!(p.after.as_deref(), Some("0b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b85"));
    assert_eq!(p.pusher.as_deref(), Some("jdoe"));
    // Gitea sends them newest first.
    let ids: Vec<_> = p.commits.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c4e6a8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f8a0c3", "0b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b85"]);
    assert_eq!(p.commits[0].files, ["src/parser/mod.rs", "src/parser/lexer.rs", "src/parser.rs"]);
}

#[test]
fn gitea_pull_request_opened() {
    let pr = pull_request(parse_sample(Forge::Gitea, "gitea/pull_request_opened.json", "pull_request"));
    assert_eq!(pr.repo.full_name, "acme/app");
    assert_eq!(pr.action, "opened");
    assert_eq!(pr.number, 3);
    assert_eq!(pr.title, "Add a login form");
    assert_eq!(pr.target_branch, "main");
    assert_eq!(pr.source_branch, "feature/login");
    assert_eq!(pr.head_sha, "9e1b3d5f7a9c1e3b5d7f9a1c3e5b7d9f1a3c5e72");
    assert_eq!(pr.head_repo_url.as_deref(), Some("https://gitea.example.com/jdoe/app.git"));
    assert_eq!(pr.author.as_deref(), Some("jdoe"));
    // Gitea spells it "synchronized".
    let body = String::from_utf8(sample("gitea/pull_request_opened.json")).unwrap().replacen(
        "\"action\": \"opened\"",
        "\"action\": \"synchronized\"",
        1,
    );
    let h = headers(&[("X-Forgejo-Event", "pull_request")]);
    let pr = pull_request(parse(Forge::Gitea, header_lookup(&h), body.as_bytes()).unwrap());
    assert_eq!(pr.action, "synchronize");
}

#[test]
fn forgejo_event_header_is_read() {
    let h = headers(&[("X-Forgejo-Event", "push"), ("X-Gitea-Event", "push")]);
    let p = push(parse(Forge::Gitea, header_lookup(&h), &sample("gitea/push.json")).unwrap());
    assert_eq!(p.branch.as_deref(), Some("main"));
    let h = headers(&[("X-Gitea-Event", "create")]);
    let got = parse(Forge::Gitea, header_lookup(&h), b"{}").unwrap();
    assert!(matches!(&got, Event::Ignored { kind, .. } if kind == "create"), "{got:?}");
}

#[test]
fn missing_event_header_is_an_error() {
    let nothing: Vec<(String, String)> = Vec::new();
    for (forge, header) in
        [(Forge::GitHub, "X-GitHub-Event"), (Forge::GitLab, "X-Gitlab-Event"), (Forge::Gitea, "X-Gitea-Event")]
    {
        assert_eq!(parse(forge, header_lookup(&nothing), b"{}"), Err(ParseError::MissingEventHeader { header }));
    }
}

#[test]
fn malformed_json_is_a_json_error() {
    let h = headers(&[("X-GitHub-Event", "push")]);
    for body in [
        &b""[..],
        b"{",
        b"not json",
        b"[]",
        b"{\"ref\": 5}",
        b"{\"commits\": \"many\"}",
        b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D",
    ] {
        let got = parse(Forge::GitHub, header_lookup(&h), body);
        assert!(matches!(got, Err(ParseError::Json { .. })), "{}: {got:?}", String::from_utf8_lossy(body));
    }
    let h = headers(&[("X-Gitlab-Event", "Merge Request Hook")]);
    let got = parse(Forge::GitLab, header_lookup(&h), b"{\"object_attributes\": {\"iid\": -1}}");
    assert!(matches!(got, Err(ParseError::Json { .. })), "{got:?}");
}

#[test]
fn missing_required_fields_are_named() {
    let cases: &[(Forge, &str, &str, &str)] = &[
        (Forge::GitHub, "push", "{}", "ref"),
        (Forge::GitHub, "push", r#"{"ref": "refs/heads/main"}"#, "repository"),
        (Forge::GitHub, "push", r#"{"ref": "refs/heads/main", "repository": {"name": "app"}}"#, "repository.full_name"),
        (Forge::GitHub, "push", r#"{"ref": "refs/heads/main", "repository": {"full_name": "acme/app"}}"#, "after"),
        (
            Forge::GitHub,
            "push",
            r#"{"ref": "refs/heads/main", "after": "ab", "repository": {"full_name": "acme/app"}, "commits": [{"message": "x"}]}"#,
            "commits[].id",
        ),
        (Forge::GitHub, "pull_request", "{}", "action"),
        (Forge::GitHub, "pull_request", r#"{"action": "opened"}"#, "pull_request"),
        (
            Forge::GitHub,
            "pull_request",
            r#"{"action": "opened", "pull_request": {"base": {"ref": "main"}}}"#,
            "pull_request.head",
        ),
        (
            Forge::Gitea,
            "pull_request",
            r#"{"action": "opened", "pull_request": {"head": {"ref": "x"}, "base": {"ref": "main"}}, "repository": {"full_name": "acme/app"}, "number": 1}"#,
            "pull_request.head.sha",
        ),
        (Forge::GitLab, "Push Hook", r#"{"ref": "refs/heads/main"}"#, "project"),
        (
            Forge::GitLab,
            "Push Hook",
            r#"{"ref": "refs/heads/main", "project": {"name": "app"}}"#,
            "project.path_with_namespace",
        ),
        (Forge::GitLab, "Merge Request Hook", "{}", "object_attributes"),
        (
            Forge::GitLab,
            "Merge Request Hook",
            r#"{"object_attributes": {"action": "open"}}"#,
            "object_attributes.last_commit",
        ),
    ];
    for &(forge, kind, body, field) in cases {
        let h = headers(&[(event_header(forge), kind)]);
        assert_eq!(
            parse(forge, header_lookup(&h), body.as_bytes()),
            Err(ParseError::MissingField { field }),
            "{forge} {kind} {body}"
        );
    }
}

// ------------------------------------------------------------------------- RepoRef

fn acme_app() -> RepoRef {
    RepoRef {
        full_name: "acme/app".into(),
        name: "app".into(),
        urls: vec![
            "https://github.com/acme/app.git".into(),
            "git@github.com:acme/app.git".into(),
            "https://github.com/acme/app".into(),
        ],
    }
}

#[test]
fn repo_ref_matches_url_variants() {
    let repo = acme_app();
    for url in [
        "https://github.com/acme/app.git",
        "https://github.com/acme/app",
        "https://github.com/acme/app/",
        "http://github.com/acme/app.git",
        "https://token@github.com/acme/app.git",
        "HTTPS://GitHub.com/Acme/App.git",
        "git@github.com:acme/app.git",
        "git@github.com:acme/app",
        "ssh://git@github.com/acme/app.git",
        "ssh://git@github.com:22/acme/app.git",
        "git://github.com/acme/app.git",
    ] {
        assert!(repo.matches(url, "whatever"), "{url}");
    }
}

#[test]
fn repo_ref_matches_local_paths_by_name() {
    let repo = acme_app();
    for path in [
        "/srv/git/app",
        "/srv/git/app/",
        "/srv/git/app.git",
        "/srv/git/app/.git",
        "file:///srv/git/app",
        "./repos/app",
        "app",
    ] {
        assert!(repo.matches(path, ""), "{path}");
    }
    // A local path with another last component matches through the configured name.
    assert!(repo.matches("/tmp/.tmpXYZ/origin", "app"));
    assert!(!repo.matches("/tmp/.tmpXYZ/origin", "lib"));
}

#[test]
fn repo_ref_non_matches() {
    let repo = acme_app();
    for url in [
        "https://github.com/acme/lib.git",
        "https://github.com/other/app.git",
        "git@gitlab.com:acme/app.git",
        "https://github.com/acme/app-extra",
        "/srv/git/lib",
        "file:///srv/git/application",
    ] {
        assert!(!repo.matches(url, "lib"), "{url}");
    }
    // A remote URL never falls back to the name: other/app is not acme/app.
    assert!(!repo.matches("https://github.com/other/app.git", "app"));
}

#[test]
fn sample_repos_match_a_repository_configured_as_app() {
    for &(forge, name, kind) in SAMPLES {
        let repo = match parse_sample(forge, name, kind) {
            Event::Push(p) => p.repo,
            Event::PullRequest(pr) => pr.repo,
            Event::Ignored { .. } => continue,
        };
        assert!(repo.matches("/srv/repos/app", "app"), "{name}");
        let first = repo.urls.first().cloned().unwrap_or_default();
        assert!(repo.matches(&first, "app"), "{name}: {first}");
    }
}

// ---------------------------------------------------------------------- robustness

fn parse_all_kinds(body: &[u8]) {
    for (forge, kind) in [
        (Forge::GitHub, "push"),
        (Forge::GitHub, "pull_request"),
        (Forge::GitLab, "Push Hook"),
        (Forge::GitLab, "Tag Push Hook"),
        (Forge::GitLab, "Merge Request Hook"),
        (Forge::Gitea, "push"),
        (Forge::Gitea, "pull_request"),
    ] {
        let h = headers(&[(event_header(forge), kind)]);
        let _ = parse(forge, header_lookup(&h), body);
    }
}

/// Truncated samples parse to an error, not a panic: every cut in the first and last KiB,
/// and every 37th byte between (every cut would be quadratic in the sample's size).
#[test]
fn truncated_samples_never_panic() {
    for &(forge, name, kind) in SAMPLES {
        let body = sample(name);
        let h = headers(&[(event_header(forge), kind)]);
        let whole = body.trim_ascii_end().len();
        let cuts = (0..whole).filter(|&len| len < 1024 || whole - len <= 1024 || len % 37 == 0);
        for len in cuts {
            let got = parse(forge, header_lookup(&h), &body[..len]);
            if kind != "ping" {
                assert!(got.is_err(), "{name} cut at {len} parsed: {got:?}");
            }
        }
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let body = format!("{{\"commits\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let h = headers(&[("X-GitHub-Event", "push")]);
    assert!(matches!(parse(Forge::GitHub, header_lookup(&h), body.as_bytes()), Err(ParseError::Json { .. })));
}

fn all_samples() -> Vec<Vec<u8>> {
    SAMPLES.iter().map(|(_, name, _)| sample(name)).collect()
}

proptest! {
    #[test]
    fn garbled_samples_never_panic(
        which in 0..SAMPLES.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut body = all_samples().swap_remove(which);
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        parse_all_kinds(&body);
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_all_kinds(&body);
        for forge in [Forge::GitHub, Forge::GitLab, Forge::Gitea] {
            let _ = verify(forge, header_lookup(&[]), &body, SECRET);
        }
    }

    #[test]
    fn arbitrary_signature_headers_never_verify_or_panic(value in ".{0,80}") {
        let body = b"{}";
        for (forge, name) in [
            (Forge::GitHub, "X-Hub-Signature-256"),
            (Forge::Gitea, "X-Gitea-Signature"),
            (Forge::GitLab, "X-Gitlab-Token"),
        ] {
            let h = vec![(name.to_string(), value.clone())];
            prop_assert!(verify(forge, header_lookup(&h), body, SECRET).is_err());
        }
    }

    #[test]
    fn arbitrary_json_values_never_panic(value in arb_json()) {
        parse_all_kinds(value.to_string().as_bytes());
    }
}

/// JSON built from the payloads' own field names, so parsing gets past the first level.
fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z0/]{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("refs/heads/main")),
        Just(serde_json::Value::from("0000000000000000000000000000000000000000")),
    ];
    let keys = prop::sample::select(vec![
        "ref",
        "before",
        "after",
        "checkout_sha",
        "repository",
        "project",
        "full_name",
        "name",
        "path_with_namespace",
        "commits",
        "id",
        "added",
        "modified",
        "removed",
        "author",
        "pusher",
        "action",
        "number",
        "pull_request",
        "head",
        "base",
        "sha",
        "repo",
        "iid",
        "object_attributes",
        "last_commit",
        "oldrev",
        "source",
        "user",
        "clone_url",
    ]);
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..8)
                .prop_map(|m| { serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()) }),
        ]
    })
}

// ------------------------------------------------------------------------------ pull requests

mod pull_requests {
    //! A pull request's head against a real repository: the forge's PR ref is fetched into the
    //! mirror, and one head is recorded once.

    use super::*;
    use rbb_master::engine::PullRequestChange;
    use rbb_master::mirror::Mirror;
    use rbb_master::sources::{PullRequestError, PullRequestOutcome, SourceRepo};
    use std::path::Path;
    use std::process::{Command, Stdio};

    fn script(name: &str, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/fixtures").join(name);
        let mut child = Command::new("sh")
            .arg(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn git(repo: &Path, args: &[&str]) -> String {
        let out = Command::new("git").arg("-C").arg(repo).args(args).env("GIT_CONFIG_NOSYSTEM", "1").output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A repository `app` on `main`, and a commit that only the forge's PR ref `pr_ref` holds
    /// (as for a pull request from a fork). Returns the source repo and that commit.
    fn setup(tmp: &Path, pr_ref: &str) -> (PathBuf, SourceRepo, String) {
        let content = tmp.join("content");
        std::fs::create_dir_all(&content).unwrap();
        std::fs::write(content.join("README.md"), "r\n").unwrap();
        let src = tmp.join("app");
        script("mkrepo.sh", &[content.to_str().unwrap(), src.to_str().unwrap()], "");
        git(&src, &["checkout", "-q", "-b", "fork-work"]);
        script("commit.sh", &[src.to_str().unwrap(), "src/pr.c", "3", "PR work"], "pr\n");
        let head = script("commit.sh", &[src.to_str().unwrap(), "docs/pr.md", "4", "PR docs"], "d\n");
        git(&src, &["checkout", "-q", "main"]);
        git(&src, &["update-ref", pr_ref, &head]);
        git(&src, &["branch", "-q", "-D", "fork-work"]);
        let mirror = Mirror::open(src.to_str().unwrap(), &tmp.join("m.git")).unwrap();
        let repo = SourceRepo::new(
            "app".into(),
            src.display().to_string(),
            mirror,
            vec!["main".into()],
            std::time::Duration::from_secs(60),
        );
        repo.poll(true, &mut |_: &str, _: &[rbb_master::engine::NewCommit]| Ok::<(), String>(())).unwrap();
        (src, repo, head)
    }

    fn pr(number: u64, head: &str, action: &str) -> PullRequest {
        let mut pr = pull_request(parse_sample(Forge::GitHub, "github/pull_request_opened.json", "pull_request"));
        pr.number = number;
        pr.head_sha = head.to_owned();
        pr.action = action.to_owned();
        pr
    }

    fn record_ok(seen: &mut Vec<PullRequestChange>) -> impl FnMut(&PullRequestChange) -> Result<Vec<u64>, String> + '_ {
        move |change| {
            seen.push(change.clone());
            Ok(vec![seen.len() as u64])
        }
    }

    #[test]
    fn a_fork_head_is_fetched_from_the_pull_ref_and_a_redelivery_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (_src, repo, head) = setup(tmp.path(), "refs/pull/7/head");
        assert!(!repo.mirror.has_commit(&head).unwrap(), "the branches alone do not bring a fork's head");
        let mut seen = Vec::new();
        let out = repo.pull_request(Forge::GitHub, &pr(7, &head, "opened"), &mut record_ok(&mut seen)).unwrap();
        assert_eq!(out, PullRequestOutcome::Recorded(vec![1]));
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].number, 7);
        assert_eq!(seen[0].commit.id, head);
        assert_eq!(seen[0].commit.message, "PR docs");
        // What the pull request changes against its target, not only its tip.
        assert_eq!(seen[0].commit.files, ["docs/pr.md", "src/pr.c"]);
        // The same delivery again (or a `synchronize` with the same head): nothing new.
        for action in ["opened", "synchronize"] {
            let out = repo.pull_request(Forge::GitHub, &pr(7, &head, action), &mut record_ok(&mut seen)).unwrap();
            assert_eq!(out, PullRequestOutcome::AlreadyRecorded { number: 7, head: head.clone() });
        }
        assert_eq!(seen.len(), 1);
        // Closed, then reopened: built again.
        let out = repo.pull_request(Forge::GitHub, &pr(7, &head, "closed"), &mut record_ok(&mut seen)).unwrap();
        assert_eq!(out, PullRequestOutcome::Closed { number: 7 });
        let out = repo.pull_request(Forge::GitHub, &pr(7, &head, "reopened"), &mut record_ok(&mut seen)).unwrap();
        assert_eq!(out, PullRequestOutcome::Recorded(vec![2]));
    }

    #[test]
    fn a_failed_record_is_not_remembered() {
        let tmp = tempfile::tempdir().unwrap();
        let (_src, repo, head) = setup(tmp.path(), "refs/pull/8/head");
        let err = repo
            .pull_request(Forge::Gitea, &pr(8, &head, "opened"), &mut |_: &PullRequestChange| {
                Err::<Vec<u64>, _>("the disk is full")
            })
            .unwrap_err();
        assert!(matches!(err, PullRequestError::Record { number: 8, .. }), "{err:?}");
        let mut seen = Vec::new();
        let out = repo.pull_request(Forge::Gitea, &pr(8, &head, "opened"), &mut record_ok(&mut seen)).unwrap();
        assert_eq!(out, PullRequestOutcome::Recorded(vec![1]));
    }

    #[test]
    fn gitlab_merge_requests_use_their_own_ref() {
        let tmp = tempfile::tempdir().unwrap();
        let (_src, repo, head) = setup(tmp.path(), "refs/merge-requests/3/head");
        let mut seen = Vec::new();
        let out = repo.pull_request(Forge::GitLab, &pr(3, &head, "opened"), &mut record_ok(&mut seen)).unwrap();
        assert_eq!(out, PullRequestOutcome::Recorded(vec![1]));
        assert_eq!(seen[0].commit.id, head);
    }

    #[test]
    fn a_head_that_cannot_be_fetched_is_a_clear_error_and_nothing_is_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let (_src, repo, _head) = setup(tmp.path(), "refs/keep/other");
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let mut seen = Vec::new();
        let err = repo.pull_request(Forge::GitHub, &pr(9, missing, "opened"), &mut record_ok(&mut seen)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PullRequestError::HeadMissing { .. }), "{err:?}");
        assert!(
            text.contains("#9")
                && text.contains(missing)
                && text.contains("refs/pull/9/head")
                && text.contains("no such ref"),
            "{text}"
        );
        assert!(seen.is_empty());
    }
}

#[test]
fn pull_requests_from_forks_are_told_apart_from_the_repositorys_own() {
    for (forge, name, kind) in [
        (Forge::GitHub, "github/pull_request_opened.json", "pull_request"),
        (Forge::GitLab, "gitlab/merge_request_open.json", "Merge Request Hook"),
        (Forge::Gitea, "gitea/pull_request_opened.json", "pull_request"),
    ] {
        // The samples come from forks (jdoe/app into acme/app).
        let mut pr = pull_request(parse_sample(forge, name, kind));
        assert!(pr.from_fork(), "{name}: {:?} into {:?}", pr.head_repo_url, pr.repo.urls);
        // The same head in the base repository (its URL spelt another way) is not a fork.
        let own = pr.repo.urls.iter().find(|u| u.starts_with("https://")).cloned().expect("an https URL");
        pr.head_repo_url = Some(own.trim_end_matches(".git").to_uppercase());
        assert!(!pr.from_fork(), "{name}: {:?}", pr.head_repo_url);
        // A head whose repository the forge does not name (a deleted fork) counts as one.
        pr.head_repo_url = None;
        assert!(pr.from_fork(), "{name}");
    }
}
