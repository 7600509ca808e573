//! The backend suite against the embedded memory backend.

mod support;

use support::suite::{self, Deployment};
use support::{test_config, TestServer};

struct Memory;

impl Deployment for Memory {
    async fn instance(&self) -> TestServer {
        TestServer::start(test_config()).await
    }
}

#[tokio::test]
async fn post_reaches_its_room_only() {
    suite::post_reaches_its_room_only(&Memory).await;
}

#[tokio::test]
async fn history_then_ready_then_live() {
    suite::history_then_ready_then_live(&Memory).await;
}

#[tokio::test]
async fn since_gives_exactly_the_rest() {
    suite::since_gives_exactly_the_rest(&Memory).await;
}

#[tokio::test]
async fn unknown_since_resets() {
    suite::unknown_since_resets(&Memory).await;
}

#[tokio::test]
async fn client_id_is_idempotent() {
    suite::client_id_is_idempotent(&Memory).await;
}

#[tokio::test]
async fn odd_text_round_trips() {
    suite::odd_text_round_trips(&Memory).await;
}

#[tokio::test]
async fn order_is_kept() {
    suite::order_is_kept(&Memory).await;
}
