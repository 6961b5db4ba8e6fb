//! The rbb web UI: plain HTML, CSS and JavaScript modules under `assets/`, embedded in the
//! binary at compile time (no build step, no network fetches: it works offline).
//!
//! This crate only hands out the files and their content types; the master serves them
//! (`master/src/ui.rs`). The UI itself is a client of the public REST API (`/api/v2`) and
//! must not reach anything else: no server-side rendering, no private endpoints.

use std::borrow::Cow;

#[derive(rust_embed::RustEmbed)]
#[folder = "assets/"]
struct Assets;

/// One embedded file.
#[derive(Debug, Clone)]
pub struct Asset {
    pub bytes: Cow<'static, [u8]>,
    /// `Content-Type` value.
    pub mime: &'static str,
    /// A strong validator for `ETag` (hex SHA-256 of the content, quoted).
    pub etag: String,
}

/// The file at `path` (relative to `assets/`, e.g. `app.js`), if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let file = Assets::get(path)?;
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()));
    Some(Asset { bytes: file.data, mime: mime(path), etag })
}

/// Paths of every embedded file.
pub fn paths() -> impl Iterator<Item = Cow<'static, str>> {
    Assets::iter()
}

/// The content type for a file name, by extension.
pub fn mime(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> String {
        let a = asset(path).unwrap_or_else(|| panic!("no asset {path}"));
        String::from_utf8(a.bytes.into_owned()).unwrap_or_else(|_| panic!("{path} is not UTF-8"))
    }

    #[test]
    fn index_and_its_modules_are_embedded_with_their_types() {
        let index = asset("index.html").expect("index.html");
        assert_eq!(index.mime, "text/html; charset=utf-8");
        assert!(index.etag.starts_with('"') && index.etag.len() == 66, "{}", index.etag);
        assert_eq!(asset("app.js").expect("app.js").mime, "text/javascript; charset=utf-8");
        assert_eq!(asset("app.css").expect("app.css").mime, "text/css; charset=utf-8");
        assert!(asset("missing.js").is_none());
        assert!(asset("../Cargo.toml").is_none());
    }

    #[test]
    fn every_file_has_a_known_type() {
        for p in paths() {
            assert_ne!(mime(&p), "application/octet-stream", "{p} has no content type: add its extension to mime()");
        }
    }

    /// Everything the page loads is under `/ui/` and embedded, so the UI works offline.
    #[test]
    fn the_ui_loads_nothing_from_the_network_and_every_reference_resolves() {
        let mut refs = Vec::new();
        for p in paths() {
            if !(p.ends_with(".html") || p.ends_with(".js") || p.ends_with(".css")) {
                continue;
            }
            let t = text(&p);
            for bad in ["http://", "https://", "src=\"//", "href=\"//", "url(//", "@import"] {
                // The SVG namespace is an identifier, not a fetch.
                let hits = t.match_indices(bad).filter(|(i, _)| !t[*i..].starts_with("http://www.w3.org/"));
                assert_eq!(hits.count(), 0, "{p} refers to the network with `{bad}`");
            }
            for quote in ['"', '\''] {
                for (i, _) in t.match_indices(&format!("{quote}/ui/")) {
                    let rest = &t[i + 5..];
                    let end = rest.find(quote).expect("closing quote");
                    refs.push((p.to_string(), rest[..end].to_owned()));
                }
                for (i, _) in t.match_indices(&format!("from {quote}./")) {
                    let rest = &t[i + 8..];
                    let end = rest.find(quote).expect("closing quote");
                    refs.push((p.to_string(), rest[..end].to_owned()));
                }
            }
        }
        assert!(refs.iter().any(|(_, r)| r == "app.js"), "index.html does not load app.js: {refs:?}");
        for (from, r) in refs {
            assert!(asset(&r).is_some(), "{from} refers to {r}, which is not embedded");
        }
    }
}
