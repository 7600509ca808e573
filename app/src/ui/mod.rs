//! The Leptos chat client: one page at `/` (room from `?room=`), a 404 page
//! for every other path, and the HTML shell the server renders them into.
//!
//! - `chat.rs`: the page's state (signals) and what happens to it when a
//!   frame arrives, a message is sent, the room changes. No browser calls.
//! - `page.rs`: the components (header, message list, composer).
//! - `net.rs` (browser only): the WebSocket with backoff and resume, the
//!   POST with retries, storage, timers, clock and scrolling.
//!
//! The same components run three ways: `ssr` (the server renders the first
//! HTML, with the room's recent history), `hydrate` (the cargo-leptos wasm
//! takes that HTML over) and `csr` (trunk, development). Message data only
//! ever reaches the DOM as text nodes; nothing here sets inner HTML.

mod chat;
#[cfg(feature = "browser")]
mod net;
mod page;

pub use chat::{Chat, Delivery, Item, Status};
pub use page::ChatPage;

use leptos::prelude::*;
use leptos_meta::{provide_meta_context, Title};
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::path;

/// Where the server-side render gets a room's recent history from (the
/// server provides it as context; the app crate knows nothing of the hub).
#[cfg(feature = "ssr")]
#[derive(Clone)]
pub struct HistorySource(pub std::sync::Arc<HistoryFn>);

/// A room's recent history, oldest first.
#[cfg(feature = "ssr")]
pub type HistoryFn = dyn Fn(&str) -> Vec<crate::HistoryEntry> + Send + Sync;

/// The document around the app, rendered by the server only. `options`
/// names the wasm/JS/CSS files under `/pkg`.
#[cfg(feature = "ssr")]
pub fn shell(options: leptos::config::LeptosOptions) -> impl IntoView {
    use leptos::hydration::HydrationScripts;
    use leptos_meta::MetaTags;
    let css = options.css_path();
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover"/>
                <meta name="color-scheme" content="light dark"/>
                <link rel="icon" href="data:,"/>
                <link rel="stylesheet" href=css/>
                <HydrationScripts options/>
                <MetaTags/>
            </head>
            <body>
                <App/>
            </body>
        </html>
    }
}

/// The whole client: the chat at `/`, a 404 page elsewhere.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    // The page is interactive once this runs: effects run only in the
    // browser, after hydration (or the first client-side render) is done.
    Effect::new(move |_| {
        #[cfg(feature = "browser")]
        net::mark_hydrated();
    });
    view! {
        <Router>
            <Routes fallback=NotFound>
                <Route path=path!("/") view=ChatPage/>
            </Routes>
        </Router>
    }
}

/// Every path that is not a page. The server answers it with status 404.
#[component]
pub fn NotFound() -> impl IntoView {
    view! {
        <Title text="Page not found · kinesis-chat"/>
        <main class="not-found">
            <h1>"Page not found"</h1>
            <p>"There is nothing at this address. The chat is at the start page."</p>
            <p><A href="/">"Go to the lobby"</A></p>
        </main>
    }
}
