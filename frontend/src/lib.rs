//! The wasm entry point of kinesis-chat's Leptos client (the UI itself is
//! `app::ui`). Built by cargo-leptos with `hydrate` (take over the page the
//! server rendered) or by trunk with `csr` (render in the browser only).

#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::ui::App);
}

/// trunk calls `main` of the cdylib it builds.
#[cfg(all(feature = "csr", not(feature = "hydrate")))]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(app::ui::App);
}
