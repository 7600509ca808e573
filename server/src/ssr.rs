//! The Leptos client at `/`: the server renders the page (with the room's
//! recent history, so the first HTML already shows it), the browser loads
//! the wasm/JS/CSS under `/pkg/` that `cargo leptos build` wrote to the
//! site root, and hydrates. Every unknown path that is not an API path gets
//! the app's own 404 page (status 404); `/api/*` keeps the JSON 404.
//!
//! The site root is found without depending on the working directory:
//! `LEPTOS_SITE_ROOT` if set, else `target/site` under the working
//! directory, else `target/site` in the workspace this binary was built
//! from. Without it, `/` still renders (history and all) but cannot
//! become interactive; start-up says so.

use crate::{api, AppState};
use app::ui::{shell, HistorySource};
use app::{HistoryEntry, DEFAULT_HISTORY};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use leptos::config::LeptosOptions;
use leptos::prelude::{provide_context, use_context};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower_http::services::{ServeDir, ServeFile};

/// The file names under `/pkg` (cargo-leptos `output-name`).
const OUTPUT_NAME: &str = "kinesis-chat";
/// Where cargo-leptos writes the site, relative to the workspace root.
const SITE_ROOT: &str = "target/site";
/// The workspace root at build time (the server crate's parent).
const WORKSPACE_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The Leptos options, resolved once per process.
pub fn options() -> &'static LeptosOptions {
    static OPTIONS: OnceLock<LeptosOptions> = OnceLock::new();
    OPTIONS.get_or_init(|| {
        let site_root = site_root();
        LeptosOptions::builder()
            .output_name(std::env::var("LEPTOS_OUTPUT_NAME").unwrap_or_else(|_| OUTPUT_NAME.to_owned()))
            .site_root(site_root.to_string_lossy().into_owned())
            .site_pkg_dir(std::env::var("LEPTOS_SITE_PKG_DIR").unwrap_or_else(|_| "pkg".to_owned()))
            .env(leptos::config::Env::PROD)
            .build()
    })
}

fn site_root() -> PathBuf {
    if let Some(root) = std::env::var_os("LEPTOS_SITE_ROOT").filter(|r| !r.is_empty()) {
        let root = PathBuf::from(root);
        if root.is_absolute() || root.join("pkg").is_dir() {
            return root;
        }
        // A relative root (cargo-leptos passes "target/site") that is not
        // under the working directory: try the build's workspace.
        let from_workspace = Path::new(WORKSPACE_ROOT).join(&root);
        return if from_workspace.join("pkg").is_dir() { from_workspace } else { root };
    }
    let here = PathBuf::from(SITE_ROOT);
    if here.join("pkg").is_dir() {
        return here;
    }
    Path::new(WORKSPACE_ROOT).join(SITE_ROOT)
}

/// Logs where the client's files come from, or that they are missing.
pub fn log_site() {
    let o = options();
    let wasm = Path::new(&*o.site_root).join(&*o.site_pkg_dir).join(format!("{}.wasm", o.output_name));
    if wasm.is_file() {
        tracing::info!(site_root = %o.site_root, "serving the Leptos client");
    } else {
        tracing::warn!(
            missing = %wasm.display(),
            "the Leptos client is not built: `/` renders but will not become interactive \
             (run `cargo leptos build --release`, or set LEPTOS_SITE_ROOT); /plain/ works"
        );
    }
}

/// Whether every file under `pkg` has a `.gz` copy at least as new as it
/// (`scripts/build-release` and `scripts/run` write them after building).
/// A stale copy would serve an old wasm beside new JS, so then none is used.
fn gzip_copies_are_fresh(pkg: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(pkg) else { return false };
    let mut any = false;
    for entry in entries.flatten() {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !matches!(ext, "wasm" | "js" | "css") {
            continue;
        }
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let gz = path.with_extension(format!("{ext}.gz"));
        match (modified(&path), modified(&gz)) {
            (Some(orig), Some(copy)) if copy >= orig => any = true,
            _ => return false,
        }
    }
    any
}

/// The page routes (`/` and `/pkg/*`); merged into the app's router.
pub fn routes() -> Router<AppState> {
    // Leptos spawns its rendering tasks on tokio; an Err only means another
    // router in this process already set it up.
    let _ = any_spawner::Executor::init_tokio();
    let o = options();
    let pkg = Path::new(&*o.site_root).join(&*o.site_pkg_dir);
    let mut files = ServeDir::new(&pkg).append_index_html_on_directories(false);
    let gzipped = gzip_copies_are_fresh(&pkg);
    if gzipped {
        files = files.precompressed_gzip();
    }
    // A server built by plain `cargo build` (no LEPTOS_OUTPUT_NAME at compile
    // time) asks for wasm-bindgen's `<name>_bg.wasm`; cargo-leptos writes
    // `<name>.wasm`. Answer both, so any build of the server works.
    let mut router = Router::new().route("/", get(page));
    let bg_name = format!("{}_bg.wasm", o.output_name);
    if !pkg.join(&bg_name).exists() {
        let mut wasm = ServeFile::new(pkg.join(format!("{}.wasm", o.output_name)));
        if gzipped {
            wasm = wasm.precompressed_gzip();
        }
        router = router.route_service(&format!("/{}/{bg_name}", o.site_pkg_dir), wasm);
    }
    router.nest_service(&format!("/{}", o.site_pkg_dir), files)
}

/// `GET /`: the chat page, rendered with the room's recent history.
async fn page(State(state): State<AppState>, request: Request) -> Response {
    render(state, request).await
}

/// Every path no route matched: the JSON 404 under `/api/`, else the app's
/// 404 page.
pub async fn fallback(State(state): State<AppState>, request: Request) -> Response {
    let path = request.uri().path();
    if path == "/api" || path.starts_with("/api/") || request.method() != axum::http::Method::GET {
        return api::not_found(request).await.into_response();
    }
    let mut response = render(state, request).await;
    if response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}

async fn render(state: AppState, request: Request) -> Response {
    let source = HistorySource(Arc::new(move |room: &str| -> Vec<HistoryEntry> {
        state
            .rooms
            .history(room, None, DEFAULT_HISTORY)
            .iter()
            .map(|e| HistoryEntry { cursor: e.cursor.clone(), message: e.message.clone() })
            .collect()
    }));
    let options = options().clone();
    let context = {
        let options = options.clone();
        move || {
            provide_context(source.clone());
            provide_context(options.clone());
            // No inline script runs but Leptos's own, which carries this
            // request's nonce; wasm needs 'wasm-unsafe-eval'.
            if let (Some(nonce), Some(response)) =
                (leptos::nonce::use_nonce(), use_context::<leptos_axum::ResponseOptions>())
            {
                if let Ok(csp) = HeaderValue::from_str(&csp(&nonce.to_string())) {
                    response.insert_header(header::CONTENT_SECURITY_POLICY, csp);
                }
            }
        }
    };
    let handler = leptos_axum::render_app_async_with_context(context, move || shell(options.clone()));
    let mut response: Response<Body> = handler(request).await;
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn csp(nonce: &str) -> String {
    format!(
        "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; style-src 'self'; \
         connect-src 'self' ws: wss:; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
         frame-ancestors 'none'"
    )
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::{app, AppState};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use clap::Parser;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    async fn get(router: &axum::Router, path: &str) -> (StatusCode, String, String, String) {
        let resp = router.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let header = |name: &str| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
        };
        let (ctype, csp) = (header("content-type"), header("content-security-policy"));
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (status, ctype, csp, body)
    }

    #[tokio::test]
    async fn the_page_carries_the_room_and_its_history_as_text_and_unknown_paths_are_404() {
        let config = Config::parse_from(["kinesis-chat"]);
        let state = AppState::build(&config, CancellationToken::new()).await.unwrap();
        let router = app(state);
        let post = Request::post("/api/messages")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"room":"ssr-test","author":"<i>ana</i>","text":"<script>x()</script>\nline two"}"#))
            .unwrap();
        assert_eq!(router.clone().oneshot(post).await.unwrap().status(), StatusCode::CREATED);

        let (status, ctype, csp, html) = get(&router, "/?room=ssr-test").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ctype.starts_with("text/html"), "{ctype}");
        assert!(csp.contains("'nonce-") && csp.contains("'wasm-unsafe-eval'"), "{csp}");
        assert!(html.contains(r#"data-testid="room">ssr-test<"#), "{html}");
        assert!(html.contains("&lt;script&gt;x()&lt;/script&gt;\nline two"), "{html}");
        assert!(html.contains("&lt;i&gt;ana&lt;/i&gt;"), "{html}");
        assert!(!html.contains("<script>x()") && !html.contains("<i>ana"), "message data became markup");
        assert!(html.contains(r#"data-state="connecting""#));

        let (status, ctype, _, html) = get(&router, "/no/such/page").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(ctype.starts_with("text/html"));
        assert!(html.contains("Page not found"));

        let (status, ctype, _, body) = get(&router, "/api/no-such-thing").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(ctype.starts_with("application/json"), "{ctype}");
        assert!(body.contains("\"error\""));
    }
}
