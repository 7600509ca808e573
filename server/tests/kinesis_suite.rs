//! The shared backend suite (support/suite.rs) against the Kinesis backend
//! on kinesis-mock: one emulator and one fresh stream per test.

mod support;

use support::emulator::{kinesis_config, start_ready, Emulator};
use support::suite::{self, Deployment};
use support::TestServer;

/// Instances of one deployment: the same emulator and stream.
struct Kinesis {
    emulator: Emulator,
    stream: String,
}

impl Kinesis {
    async fn new() -> Kinesis {
        let emulator = Emulator::start().await;
        let stream = emulator.create_stream("suite", 2).await;
        Kinesis { emulator, stream }
    }
}

impl Deployment for Kinesis {
    async fn instance(&self) -> TestServer {
        start_ready(kinesis_config(&self.emulator.endpoint(), &self.stream)).await
    }
}

#[tokio::test]
async fn post_reaches_its_room_only() {
    suite::post_reaches_its_room_only(&Kinesis::new().await).await;
}

#[tokio::test]
async fn history_then_ready_then_live() {
    suite::history_then_ready_then_live(&Kinesis::new().await).await;
}

#[tokio::test]
async fn since_gives_exactly_the_rest() {
    suite::since_gives_exactly_the_rest(&Kinesis::new().await).await;
}

#[tokio::test]
async fn unknown_since_resets() {
    suite::unknown_since_resets(&Kinesis::new().await).await;
}

#[tokio::test]
async fn client_id_is_idempotent() {
    suite::client_id_is_idempotent(&Kinesis::new().await).await;
}

#[tokio::test]
async fn odd_text_round_trips() {
    suite::odd_text_round_trips(&Kinesis::new().await).await;
}

#[tokio::test]
async fn order_is_kept() {
    suite::order_is_kept(&Kinesis::new().await).await;
}
