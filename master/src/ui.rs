//! Serves the web UI (the `rbb-web` crate's embedded files): `GET /` is the page, `GET
//! /ui/{path}` its scripts, styles and images. Nothing here knows what the UI shows: it is a
//! client of the public REST API like any other, and this module must not grow endpoints for it.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// Routes serving the UI.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/ui/{*path}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

/// The asset with its type, `Cache-Control: no-cache` (revalidate every time, so a new
/// master binary's UI is picked up at once) and an `ETag` that makes revalidation cheap.
fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = rbb_web::asset(path) else {
        let body = rbb_schema::api::ErrorBody {
            error: rbb_schema::api::ErrorDetail { code: "not_found".into(), message: format!("no UI file `{path}`") },
        };
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    };
    let etag = HeaderValue::from_str(&asset.etag).unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == asset.etag || t.trim() == "*"));
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    let mut resp = (common, asset.bytes.into_owned()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.mime));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = router::<()>().oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_with_types_and_no_cache() {
        let (status, headers, body) = get("/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        assert!(String::from_utf8_lossy(&body).contains("/ui/app.js"));
        for (path, mime) in [
            ("/ui/app.js", "text/javascript; charset=utf-8"),
            ("/ui/app.css", "text/css; charset=utf-8"),
            ("/ui/favicon.svg", "image/svg+xml"),
        ] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], mime, "{path}");
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
            assert!(!body.is_empty(), "{path}");
        }
    }

    #[tokio::test]
    async fn unknown_files_are_404_in_the_api_error_shape() {
        for path in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/%2e%2e/Cargo.toml", "/ui/assets/app.js"] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{path}");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["error"]["code"], "not_found", "{path}");
        }
    }

    #[tokio::test]
    async fn a_matching_etag_is_answered_with_304() {
        let (_, headers, _) = get("/ui/app.js", &[]).await;
        let etag = headers[header::ETAG].to_str().expect("etag").to_owned();
        let (status, headers, body) = get("/ui/app.js", &[("if-none-match", &etag)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert_eq!(headers[header::ETAG].to_str().expect("etag"), etag);
        assert!(body.is_empty());
        let (status, _, _) = get("/ui/app.js", &[("if-none-match", "\"other\"")]).await;
        assert_eq!(status, StatusCode::OK);
    }
}
