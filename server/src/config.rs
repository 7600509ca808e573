//! Configuration: one clap struct; every field is a flag and an env var.
//!
//! Names follow docs/PROTOCOL.md. Invalid values stop start-up with
//! one clear line (see `main.rs`), never a backtrace.

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Embedded, single instance, no cloud needed.
    Memory,
    /// Amazon Kinesis Data Streams (or an emulator via AWS_ENDPOINT_URL_KINESIS).
    Kinesis,
}

/// kinesis-chat: a chat room whose messages flow through Amazon Kinesis.
#[derive(Debug, Clone, Parser)]
#[command(name = "kinesis-chat", version, about, long_about = None)]
pub struct Config {
    /// Address to serve on (port 0 picks a free port; the chosen address is
    /// printed on stdout).
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,

    /// Stream backend.
    #[arg(long, env = "CHAT_BACKEND", value_enum, default_value_t = BackendKind::Memory)]
    pub backend: BackendKind,

    /// Kinesis stream name.
    #[arg(long, env = "CHAT_STREAM", default_value = "chat-messages")]
    pub stream: String,

    /// Create the Kinesis stream if it does not exist (development, tests).
    #[arg(long, env = "CHAT_CREATE_STREAM")]
    pub create_stream: bool,

    /// Messages kept in memory per room, for history and resuming cursors.
    #[arg(long, env = "CHAT_HISTORY_PER_ROOM", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub history_per_room: u64,

    /// Rooms kept in memory at once; idle rooms beyond this are forgotten.
    #[arg(long, env = "CHAT_MAX_ROOMS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_rooms: u64,

    /// Messages kept in memory across all rooms (bounds memory whatever
    /// room names clients invent); the oldest go first.
    #[arg(long, env = "CHAT_MAX_MESSAGES", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_messages: u64,

    /// Messages a socket may fall behind before it is closed with 4008.
    #[arg(long, env = "CHAT_WS_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub ws_queue: u64,

    /// How often the server pings each socket; a socket silent for two
    /// intervals is dropped.
    #[arg(long, env = "CHAT_WS_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ws_ping_interval: Duration,

    /// How long a write to a socket may block before the socket counts as a
    /// slow consumer.
    #[arg(long, env = "CHAT_WS_WRITE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ws_write_timeout: Duration,

    /// Messages per second one client address may post (0 turns the limit off).
    #[arg(long, env = "CHAT_RATE_LIMIT", default_value_t = 10.0)]
    pub rate_limit: f64,

    /// Messages one client address may post in a burst above the rate.
    #[arg(long, env = "CHAT_RATE_BURST", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,

    /// How long shutdown waits for in-flight requests and sockets.
    #[arg(long, env = "CHAT_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Kinesis endpoint URL (a local emulator, or a proxy in tests); the SDK's
    /// default AWS endpoint for the region when unset.
    #[arg(long, env = "AWS_ENDPOINT_URL_KINESIS")]
    pub kinesis_endpoint: Option<String>,

    /// Shards of a stream made by --create-stream.
    #[arg(long, env = "CHAT_KINESIS_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=500))]
    pub kinesis_shards: u32,

    /// Base interval between GetRecords calls per shard. Kinesis allows 5
    /// calls/s per shard shared by every reader, so never below 200ms; with
    /// N instances, N x 200ms avoids throttling altogether.
    #[arg(long, env = "CHAT_KINESIS_POLL_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub kinesis_poll_interval: Duration,

    /// Longest the per-shard poll interval grows to while throttled.
    #[arg(long, env = "CHAT_KINESIS_MAX_POLL_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kinesis_max_poll_interval: Duration,

    /// How far back a starting instance reads to fill its history (0 starts
    /// at the tip). The per-room history size caps what is kept.
    #[arg(long, env = "CHAT_KINESIS_BACKFILL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub kinesis_backfill: Duration,

    /// Time limit of one Kinesis call (connect, read and whole attempt).
    #[arg(long, env = "CHAT_KINESIS_CALL_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub kinesis_call_timeout: Duration,

    /// How long a POST may wait for the stream (queueing and retries)
    /// before it is answered 503; the message is then never written.
    #[arg(long, env = "CHAT_KINESIS_PUT_BUDGET", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kinesis_put_budget: Duration,

    /// Longest a message waits for others to share its PutRecords call
    /// while another call is in flight (an idle producer sends at once).
    #[arg(long, env = "CHAT_KINESIS_LINGER", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub kinesis_linger: Duration,

    /// Messages waiting for the stream at once; beyond this POSTs get 503.
    #[arg(long, env = "CHAT_KINESIS_PRODUCER_QUEUE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub kinesis_producer_queue: u64,

    /// How often the shard list is refreshed (to see reshards by others).
    #[arg(long, env = "CHAT_KINESIS_LIST_SHARDS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub kinesis_list_shards_interval: Duration,

    /// A shard with no successful read for this long makes /readyz 503.
    #[arg(long, env = "CHAT_KINESIS_STUCK_AFTER", default_value = "15s", value_parser = humantime::parse_duration)]
    pub kinesis_stuck_after: Duration,
}

impl Config {
    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if !self.rate_limit.is_finite() || self.rate_limit < 0.0 {
            return Err(format!("invalid --rate-limit {}: must be 0 (off) or a positive number", self.rate_limit));
        }
        if self.stream.is_empty()
            || self.stream.len() > 128
            || !self.stream.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(format!(
                "invalid --stream {:?}: a Kinesis stream name is 1-128 of a-z, A-Z, 0-9, '_', '.', '-'",
                self.stream
            ));
        }
        if self.ws_ping_interval < Duration::from_millis(100) {
            return Err("invalid --ws-ping-interval: must be at least 100ms".into());
        }
        if self.ws_write_timeout < Duration::from_millis(100) {
            return Err("invalid --ws-write-timeout: must be at least 100ms".into());
        }
        if self.kinesis_poll_interval < Duration::from_millis(200) {
            return Err("invalid --kinesis-poll-interval: Kinesis allows 5 reads/s per shard, so at least 200ms".into());
        }
        if self.kinesis_max_poll_interval < self.kinesis_poll_interval {
            return Err("invalid --kinesis-max-poll-interval: must be at least --kinesis-poll-interval".into());
        }
        if self.kinesis_call_timeout < Duration::from_millis(100) {
            return Err("invalid --kinesis-call-timeout: must be at least 100ms".into());
        }
        if self.kinesis_put_budget < self.kinesis_call_timeout * 2 {
            return Err(
                "invalid --kinesis-put-budget: must be at least twice --kinesis-call-timeout (room for a retry)".into(),
            );
        }
        if self.kinesis_linger > Duration::from_secs(1) {
            return Err("invalid --kinesis-linger: at most 1s".into());
        }
        if self.kinesis_list_shards_interval < Duration::from_secs(1) {
            return Err("invalid --kinesis-list-shards-interval: must be at least 1s".into());
        }
        if self.kinesis_stuck_after < Duration::from_secs(1) {
            return Err("invalid --kinesis-stuck-after: must be at least 1s".into());
        }
        if let Some(url) = &self.kinesis_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("invalid --kinesis-endpoint {url:?}: must be an http:// or https:// URL"));
            }
        }
        Ok(())
    }

    /// The defaults, as if started with no flags and no environment.
    pub fn for_tests() -> Self {
        Config::parse_from(["kinesis-chat", "--listen", "127.0.0.1:0"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::try_parse_from(["kinesis-chat"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.backend, BackendKind::Memory);
        assert_eq!(c.stream, "chat-messages");
        assert!(!c.create_stream);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::try_parse_from(["kinesis-chat", "--listen", "nope"]).is_err());
        assert!(Config::try_parse_from(["kinesis-chat", "--backend", "redis"]).is_err());
        assert!(Config::try_parse_from(["kinesis-chat", "--history-per-room", "0"]).is_err());
        let c = Config::try_parse_from(["kinesis-chat", "--stream", "bad name"]).unwrap();
        assert!(c.validate().unwrap_err().contains("--stream"));
        let c = Config::try_parse_from(["kinesis-chat", "--rate-limit=-1"]).unwrap();
        assert!(c.validate().is_err());
    }
}
