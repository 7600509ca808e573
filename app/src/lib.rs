//! kinesis-chat's shared crate: the wire protocol's types and validation,
//! used by the server, the Leptos client (compiled to wasm) and the tests.
//!
//! No server or browser dependencies live at the top level; server-only code
//! is behind the `ssr` feature, browser-only code behind `hydrate`/`csr`.

pub mod protocol;
#[cfg(feature = "ui")]
pub mod ui;
pub mod validate;

pub use protocol::*;
pub use validate::{validate_post, ValidPost, ValidationError};
