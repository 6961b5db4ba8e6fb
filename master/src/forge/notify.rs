//! Notifications of finished builds: which rules want a build (builders, only failures, only
//! changes of result), the outgoing webhook body (JSON or Slack text) with its HMAC
//! signature, and the e-mail to the authors of the build's changes over SMTP (`lettre`).
//! Delivery of webhooks goes through the sender's [`Transport`](super::sender::Transport).

use super::status::Request;
use crate::model::BuildRecord;
use hmac::{Hmac, Mac};
use rbb_schema::config::{EmailConfig, NotificationConfig, NotifyFormat, NotifyWhen, SmtpTls};
use rbb_schema::results::Outcome;
use sha2::Sha256;
use std::time::Duration;

/// The header carrying a webhook body's signature: `sha256=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-Rbb-Signature-256";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification rule: invalid builder glob {glob:?}: {message}")]
    Glob { glob: String, message: String },
    #[error("e-mail: invalid address {address:?}: {message}")]
    Address { address: String, message: String },
    #[error("e-mail: cannot build the message: {0}")]
    Message(String),
    #[error("e-mail: cannot read the SMTP password file {path}: {source}")]
    PasswordFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("e-mail: SMTP server {server}: {message}")]
    Smtp { server: String, message: String },
}

/// A finished build as notifications see it.
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    pub build: &'a BuildRecord,
    /// The result of the builder's previous build on the same branch, if any.
    pub previous: Option<Outcome>,
    /// (name, e-mail) of the authors of the build's changes.
    pub authors: Vec<(String, String)>,
    /// The build's page.
    pub url: String,
}

fn is_failure(outcome: Option<Outcome>) -> bool {
    matches!(outcome, Some(Outcome::Failure | Outcome::Exception) | None)
}

/// Whether `rule` wants this build.
pub fn wanted(rule: &NotificationConfig, f: &Finished<'_>) -> Result<bool, NotifyError> {
    if !rule.builders.is_empty() {
        let mut set = globset::GlobSetBuilder::new();
        for glob in &rule.builders {
            let g = globset::GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
                .map_err(|e| NotifyError::Glob { glob: glob.clone(), message: e.to_string() })?;
            set.add(g);
        }
        let set =
            set.build().map_err(|e| NotifyError::Glob { glob: rule.builders.join(", "), message: e.to_string() })?;
        if !set.is_match(&f.build.builder) {
            return Ok(false);
        }
    }
    Ok(match rule.when.unwrap_or(NotifyWhen::Always) {
        NotifyWhen::Always => true,
        NotifyWhen::Failure => is_failure(f.build.result),
        NotifyWhen::Change => f.previous != f.build.result,
    })
}

fn result_name(outcome: Option<Outcome>) -> String {
    outcome
        .and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "UNKNOWN".to_owned())
}

fn short(sha: &str) -> &str {
    sha.get(..10).unwrap_or(sha)
}

/// The JSON body of the build-finished webhook.
pub fn json_body(f: &Finished<'_>) -> String {
    let b = f.build;
    serde_json::json!({
        "event": "build_finished",
        "build": {
            "id": b.id,
            "builder": b.builder,
            "repo": b.repo,
            "branch": b.branch,
            "commit": b.commit,
            "event": b.event,
            "result": result_name(b.result),
            "result_reason": b.result_reason,
            "previous_result": f.previous.map(|p| result_name(Some(p))),
            "started_at": b.started_at,
            "finished_at": b.finished_at,
            "url": f.url,
        },
        "authors": f.authors.iter().map(|(n, e)| serde_json::json!({"name": n, "email": e})).collect::<Vec<_>>(),
    })
    .to_string()
}

/// One line of text: builder, result, branch, commit and a link (Slack's `<url|label>`).
pub fn text(f: &Finished<'_>) -> String {
    let b = f.build;
    let mark = if is_failure(b.result) { ":x:" } else { ":white_check_mark:" };
    format!(
        "{mark} {} {} on {} ({}) <{}|build {}>",
        b.builder,
        result_name(b.result),
        b.branch,
        short(&b.commit),
        f.url,
        b.id
    )
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn sign(secret: &str, body: &str) -> String {
    // HMAC takes keys of any length, so this never fails; an unsigned marker all the same.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
        return "sha256=".to_owned();
    };
    mac.update(body.as_bytes());
    let bytes = mac.finalize().into_bytes();
    format!("sha256={}", rbb_schema::hex(&bytes))
}

/// The webhook request of `rule` for this build, or `None` if it has no webhook.
pub fn webhook_request(rule: &NotificationConfig, f: &Finished<'_>) -> Option<Request> {
    let url = rule.webhook.clone()?;
    let body = match rule.format.unwrap_or(NotifyFormat::Json) {
        NotifyFormat::Json => json_body(f),
        NotifyFormat::Slack => serde_json::json!({ "text": text(f) }).to_string(),
    };
    let mut headers = vec![("X-Rbb-Event".to_owned(), "build_finished".to_owned())];
    if let Some(secret) = &rule.secret {
        headers.push((SIGNATURE_HEADER.to_owned(), sign(secret, &body)));
    }
    Some(Request { url, headers, body })
}

/// The recipients of the e-mail: the fixed ones and (unless turned off) the authors.
pub fn recipients(email: &EmailConfig, f: &Finished<'_>) -> Vec<String> {
    let mut to: Vec<String> = email.to.clone();
    if email.to_authors.unwrap_or(true) {
        for (name, address) in &f.authors {
            if address.contains('@') && !to.iter().any(|t| t.contains(address.as_str())) {
                to.push(if name.is_empty() { address.clone() } else { format!("{name} <{address}>") });
            }
        }
    }
    to
}

/// The e-mail for this build, or `None` when it has nobody to go to.
pub fn email_message(email: &EmailConfig, f: &Finished<'_>) -> Result<Option<lettre::Message>, NotifyError> {
    let to = recipients(email, f);
    if to.is_empty() {
        return Ok(None);
    }
    let parse = |a: &str| {
        a.parse::<lettre::message::Mailbox>()
            .map_err(|e| NotifyError::Address { address: a.to_owned(), message: e.to_string() })
    };
    let b = f.build;
    let mut builder = lettre::Message::builder().from(parse(&email.from)?).subject(format!(
        "[rbb] {} {} on {} ({})",
        b.builder,
        result_name(b.result),
        b.branch,
        short(&b.commit)
    ));
    for t in &to {
        builder = builder.to(parse(t)?);
    }
    let mut body = format!(
        "Builder:  {}\nResult:   {}\nBranch:   {}\nCommit:   {}\nBuild:    {}\n",
        b.builder,
        result_name(b.result),
        b.branch,
        b.commit,
        f.url
    );
    if !b.result_reason.is_empty() {
        body.push_str(&format!("Why:      {}\n", b.result_reason));
    }
    if let Some(previous) = f.previous {
        body.push_str(&format!("Previous: {}\n", result_name(Some(previous))));
    }
    let message = builder
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| NotifyError::Message(e.to_string()))?;
    Ok(Some(message))
}

/// Sends `message` through the rule's SMTP server. Blocking.
pub fn send_email(email: &EmailConfig, message: &lettre::Message, timeout: Duration) -> Result<(), NotifyError> {
    use lettre::Transport as _;
    use lettre::transport::smtp::SmtpTransport;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Tls, TlsParameters};
    let smtp_err =
        |e: &dyn std::fmt::Display| NotifyError::Smtp { server: email.server.clone(), message: e.to_string() };
    let tls = email.tls.unwrap_or(SmtpTls::Starttls);
    let port = email.port.unwrap_or(match tls {
        SmtpTls::None => 25,
        SmtpTls::Starttls => 587,
        SmtpTls::Tls => 465,
    });
    let params = || TlsParameters::new(email.server.clone()).map_err(|e| smtp_err(&e));
    let tls = match tls {
        SmtpTls::None => Tls::None,
        SmtpTls::Starttls => Tls::Required(params()?),
        SmtpTls::Tls => Tls::Wrapper(params()?),
    };
    let mut transport =
        SmtpTransport::builder_dangerous(email.server.as_str()).port(port).tls(tls).timeout(Some(timeout));
    if let (Some(user), Some(path)) = (&email.username, &email.password_file) {
        let password = std::fs::read_to_string(path)
            .map_err(|source| NotifyError::PasswordFile { path: path.clone(), source })?
            .trim()
            .to_owned();
        transport = transport.credentials(Credentials::new(user.clone(), password));
    }
    transport.build().send(message).map(|_| ()).map_err(|e| smtp_err(&e))
}
