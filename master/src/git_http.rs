//! Serves the master's bare mirrors to workers over the master's HTTP port, read-only, as
//! git's smart HTTP (`git http-backend` run as CGI): `GET|POST /git/<repository>.git/...`.
//!
//! Workers fetch the commit they build from here, so they hold no forge credentials and the
//! forge sees one fetch per change instead of one clone per build. A worker authenticates
//! with HTTP basic auth: its name and its token from the master config. Pushes are refused.
//! This module serves bytes only; it reads no build state.

use crate::http::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::io::Write;

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut r = (status, format!("{message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"rbb\""));
    }
    r
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bytes: Vec<u8> = text.trim().bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(value(*c)?) << (18 - 6 * i);
        }
        let take = chunk.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    Some(out)
}

/// (worker, token) from a basic `Authorization` header.
fn basic_credentials(headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let text = String::from_utf8(decode_base64(encoded)?).ok()?;
    let (name, token) = text.split_once(':')?;
    Some((name.to_owned(), token.to_owned()))
}

/// The handler of `/git/{*path}`. Workers authenticate with their name and token; people
/// with an API token of role `read` or above, as the basic password (any user name) or as a
/// bearer token. Anonymous read does not extend to the mirrors: they hold the source.
pub async fn serve(State(app): State<App>, req: Request) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let (worker, token) = match (basic_credentials(req.headers()), bearer) {
        (Some(pair), _) => pair,
        (None, Some(token)) => (String::new(), token),
        (None, None) => {
            return refuse(StatusCode::UNAUTHORIZED, "workers authenticate with their name and token");
        }
    };
    let api_reader = app.security.tokens.by_token(&token).filter(|c| c.role >= rbb_schema::config::Access::Read);
    let worker = match api_reader {
        Some(caller) => format!("token:{}", caller.name),
        None if !worker.is_empty() && app.engine.authenticate(&worker, &token).is_ok() => worker,
        None => {
            tracing::warn!(%worker, "refused a mirror fetch with a wrong token");
            return refuse(StatusCode::UNAUTHORIZED, "wrong worker name or token");
        }
    };
    let path = req.uri().path().strip_prefix("/git/").unwrap_or("").to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if path.contains("receive-pack") || query.contains("receive-pack") {
        return refuse(StatusCode::FORBIDDEN, "the master's mirrors are read-only");
    }
    let Some((repo_dir, rest)) = path.split_once(".git/") else {
        return refuse(StatusCode::NOT_FOUND, "no such repository");
    };
    let Some(repo) = app.sources.as_ref().and_then(|s| s.repos.iter().find(|r| r.name == repo_dir).cloned()) else {
        return refuse(StatusCode::NOT_FOUND, "no such repository");
    };
    let mirror = repo.mirror.path().to_owned();
    let (Some(root), Some(dir_name)) = (mirror.parent(), mirror.file_name()) else {
        return refuse(StatusCode::NOT_FOUND, "no such repository");
    };
    let path_info = format!("/{}/{rest}", dir_name.to_string_lossy());
    let method = req.method().as_str().to_owned();
    let (content_type, encoding, protocol) = {
        let h = req.headers();
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        (text("content-type"), text("content-encoding"), text("git-protocol"))
    };
    let body = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request too large"),
    };
    let mut cmd = std::process::Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", method)
        .env("CONTENT_TYPE", content_type)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", encoding)
        .env("GIT_PROTOCOL", protocol)
        .env("REMOTE_USER", &worker)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take();
        let writer = std::thread::spawn(move || stdin.as_mut().map(|s| s.write_all(&body)));
        let out = child.wait_with_output()?;
        let _ = writer.join();
        Ok(out.stdout)
    })
    .await;
    let out = match out {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot run git http-backend");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "the mirror cannot be served");
        }
        Err(e) => {
            tracing::error!(error = %e, "git http-backend task failed");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "the mirror cannot be served");
        }
    };
    cgi_response(&out)
}

/// Turns CGI output (headers, a blank line, the body) into a response.
fn cgi_response(out: &[u8]) -> Response {
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    let Some((end, skip)) = split.or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2))) else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "the mirror cannot be served");
    };
    let mut response = Response::builder();
    for line in String::from_utf8_lossy(&out[..end]).lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        if k.eq_ignore_ascii_case("status") {
            let code = v.trim().split(' ').next().and_then(|c| c.parse::<u16>().ok()).unwrap_or(500);
            response = response.status(code);
        } else {
            response = response.header(k.trim(), v.trim());
        }
    }
    response
        .body(Body::from(out[end + skip..].to_vec()))
        .unwrap_or_else(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "the mirror cannot be served"))
}
