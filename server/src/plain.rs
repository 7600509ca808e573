//! The plain HTML/JS fallback client at `/plain/`, embedded in the binary
//! so it is served from any working directory. No build step.

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};

const INDEX_HTML: &str = include_str!("../static/plain/index.html");
const PLAIN_JS: &str = include_str!("../static/plain/plain.js");
const PLAIN_CSS: &str = include_str!("../static/plain/plain.css");

/// No inline script may run, whatever a message contains.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; \
                   img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    resp
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PLAIN_JS)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", PLAIN_CSS)
}

/// `/plain` → `/plain/`, keeping the query (the room).
pub async fn add_slash(request: Request) -> Redirect {
    match request.uri().query() {
        Some(q) => Redirect::permanent(&format!("/plain/?{q}")),
        None => Redirect::permanent("/plain/"),
    }
}
