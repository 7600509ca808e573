//! The wasm entry point (Leptos client: see issue #4).
