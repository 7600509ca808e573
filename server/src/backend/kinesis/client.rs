//! The Kinesis SDK clients, their timeouts, and what their errors mean.
//!
//! Two clients share one SDK configuration (region, credentials, endpoint):
//!
//! - `data` (PutRecords, GetRecords, GetShardIterator) has **no SDK
//!   retries** and a hard time limit per call: the producer and the shard
//!   readers retry themselves, against their own budgets and backoff, so a
//!   POST's deadline and a shard's poll rate stay in our hands.
//! - `control` (DescribeStreamSummary, CreateStream, ListShards) keeps the
//!   SDK's standard retries: these calls are rare and simply should succeed.
//!
//! The SDK sets no read or operation timeout by default; without these a
//! hung endpoint would hang a POST forever.

use crate::config::Config;
use aws_config::BehaviorVersion;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::StreamStatus;
use aws_sdk_kinesis::Client;
use parking_lot::Mutex;
use std::time::Duration;

/// Attempts (first try included) for control-plane calls.
const CONTROL_ATTEMPTS: u32 = 3;
/// How long start-up waits for a stream to become ACTIVE.
const ACTIVE_WAIT: Duration = Duration::from_secs(60);
/// How often start-up looks at the stream's status while waiting.
const ACTIVE_POLL: Duration = Duration::from_millis(250);
/// How long start-up keeps trying an endpoint that does not answer (an
/// emulator or network still coming up) before it gives up.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// The SDK clients and the stream they talk to.
pub struct Clients {
    /// Hot path: no SDK retries, one call = one attempt within `call_timeout`.
    pub data: Client,
    /// Rare calls: standard SDK retries.
    pub control: Client,
    pub stream: String,
    /// "region X, endpoint Y" for log lines and start-up errors.
    pub place: String,
    /// The time limit of one data call.
    pub call_timeout: Duration,
    /// Whether the last data call reached Kinesis (for `/readyz`).
    pub reach: Reachability,
}

/// Whether Kinesis answered the most recent data call (any shard reader
/// or the producer). Per-shard trouble is the reader's business; this says
/// "the endpoint is down or hangs" as soon as one call finds out.
#[derive(Default)]
pub struct Reachability {
    /// Why the last call got no answer; `None` once one is answered.
    down: Mutex<Option<String>>,
}

impl Reachability {
    /// A call got an answer (even an error answer).
    pub fn answered(&self) {
        *self.down.lock() = None;
    }

    /// Notes a failed call: only no-answer failures mean "unreachable".
    pub fn failed(&self, e: &CallError) {
        if matches!(e.kind, Failure::Unreachable | Failure::Timeout) {
            *self.down.lock() = Some(e.message.clone());
        } else {
            self.answered();
        }
    }

    pub fn readiness(&self) -> Result<(), String> {
        match &*self.down.lock() {
            Some(why) => Err(format!("Kinesis is unreachable: {why}")),
            None => Ok(()),
        }
    }
}

impl Clients {
    /// Loads the standard AWS configuration chain (region, credentials,
    /// `AWS_ENDPOINT_URL_KINESIS`), with the endpoint from the config taking
    /// precedence, and builds both clients.
    pub async fn from_config(config: &Config) -> anyhow::Result<Clients> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(url) = &config.kinesis_endpoint {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            anyhow::bail!("no AWS region configured for the Kinesis backend; set AWS_REGION (e.g. AWS_REGION=us-east-1)");
        };
        let endpoint = config.kinesis_endpoint.clone().or_else(|| sdk.endpoint_url().map(str::to_owned));
        let place = match &endpoint {
            Some(url) => format!("region {region}, endpoint {url}"),
            None => format!("region {region}"),
        };

        let call = config.kinesis_call_timeout;
        let data_timeouts = TimeoutConfig::builder()
            .connect_timeout(call)
            .read_timeout(call)
            .operation_attempt_timeout(call)
            .operation_timeout(call)
            .build();
        let data = aws_sdk_kinesis::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(data_timeouts)
            .build();

        let control_timeouts = TimeoutConfig::builder()
            .connect_timeout(call)
            .read_timeout(call)
            .operation_attempt_timeout(call)
            .operation_timeout(call * (CONTROL_ATTEMPTS + 1))
            .build();
        let control = aws_sdk_kinesis::config::Builder::from(&sdk)
            .retry_config(RetryConfig::standard().with_max_attempts(CONTROL_ATTEMPTS))
            .timeout_config(control_timeouts)
            .build();

        Ok(Clients {
            data: Client::from_conf(data),
            control: Client::from_conf(control),
            stream: config.stream.clone(),
            place,
            call_timeout: call,
            reach: Reachability::default(),
        })
    }

    /// Makes sure the stream exists and is readable: waits while it is
    /// being created, creates it when asked to, and otherwise stops
    /// start-up with one line saying what to do.
    pub async fn ensure_stream(&self, create: bool, shards: u32) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        let mut created = false;
        loop {
            let status = self.control.describe_stream_summary().stream_name(&self.stream).send().await;
            match status {
                Ok(out) => {
                    let status = out.stream_description_summary().map(|s| s.stream_status().clone());
                    match status {
                        Some(StreamStatus::Active) | Some(StreamStatus::Updating) => return Ok(()),
                        Some(StreamStatus::Deleting) => anyhow::bail!(
                            "Kinesis stream {:?} ({}) is being deleted; wait and start again",
                            self.stream,
                            self.place
                        ),
                        // CREATING, or a status this SDK does not know yet.
                        _ => {}
                    }
                }
                Err(e) => {
                    let e = CallError::from_sdk(e);
                    match e.kind {
                        Failure::NotFound if create && !created => {
                            tracing::info!(stream = %self.stream, shards, "creating the Kinesis stream");
                            let made = self
                                .control
                                .create_stream()
                                .stream_name(&self.stream)
                                .shard_count(shards as i32)
                                .send()
                                .await;
                            if let Err(e) = made {
                                let e = CallError::from_sdk(e);
                                // Someone else creating it at the same time is fine.
                                if e.code.as_deref() != Some("ResourceInUseException") {
                                    anyhow::bail!(
                                        "cannot create Kinesis stream {:?} ({}): {}",
                                        self.stream,
                                        self.place,
                                        e.message
                                    );
                                }
                            }
                            created = true;
                        }
                        Failure::NotFound if created => {}
                        Failure::NotFound => anyhow::bail!(
                            "Kinesis stream {:?} does not exist ({}); create it (see docs/KINESIS.md) or start with --create-stream",
                            self.stream,
                            self.place
                        ),
                        kind if kind.is_transient() && started.elapsed() < STARTUP_PATIENCE => {
                            tracing::warn!(error = %e, place = %self.place, "Kinesis does not answer yet; retrying");
                        }
                        _ => anyhow::bail!(
                            "cannot reach Kinesis stream {:?} ({}): {}",
                            self.stream,
                            self.place,
                            e.message
                        ),
                    }
                }
            }
            if started.elapsed() > ACTIVE_WAIT {
                anyhow::bail!(
                    "Kinesis stream {:?} ({}) did not become ACTIVE within {}s",
                    self.stream,
                    self.place,
                    ACTIVE_WAIT.as_secs()
                );
            }
            tokio::time::sleep(ACTIVE_POLL).await;
        }
    }
}

/// One shard as `ListShards` or a `ChildShards` answer describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMeta {
    pub id: String,
    /// The shard(s) this one was split or merged from; read them first.
    pub parents: Vec<String>,
    /// The hash keys (MD5 of partition keys) this shard holds.
    pub hash_start: u128,
    pub hash_end: u128,
}

impl ShardMeta {
    /// Whether records with this partition key land in this shard.
    pub fn holds(&self, hash: u128) -> bool {
        self.hash_start <= hash && hash <= self.hash_end
    }
}

impl Clients {
    /// Every shard of the stream still within retention, open or closed.
    pub async fn list_shards(&self) -> Result<Vec<ShardMeta>, CallError> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // A page token replaces the stream name (the API refuses both).
            let request = match &token {
                Some(t) => self.control.list_shards().next_token(t),
                None => self.control.list_shards().stream_name(&self.stream),
            };
            let out = request.send().await.map_err(CallError::from_sdk)?;
            for s in out.shards() {
                let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect();
                let (hash_start, hash_end) = s
                    .hash_key_range()
                    .map(|r| {
                        let start = r.starting_hash_key().parse().unwrap_or(0);
                        let end = r.ending_hash_key().parse().unwrap_or(u128::MAX);
                        (start, end)
                    })
                    .unwrap_or((0, u128::MAX));
                shards.push(ShardMeta { id: s.shard_id().to_owned(), parents, hash_start, hash_end });
            }
            match out.next_token() {
                Some(t) if !t.is_empty() && !out.shards().is_empty() => token = Some(t.to_owned()),
                _ => return Ok(shards),
            }
        }
    }
}

/// What kind of trouble a call ran into; decides retry and backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// ProvisionedThroughputExceeded, LimitExceeded, KMSThrottling, ...
    Throttled,
    /// The shard iterator is older than 5 minutes.
    ExpiredIterator,
    /// The stream or shard (or sequence number) does not exist.
    NotFound,
    /// The request was refused as invalid (bad sequence number, ...).
    InvalidArgument,
    /// No answer within the time limit; the outcome is unknown.
    Timeout,
    /// No connection (refused, reset, DNS): nothing was done.
    Unreachable,
    /// A 5xx or an unreadable answer from the service.
    Server,
    /// Anything else (access denied, bad configuration, ...).
    Other,
}

impl Failure {
    /// Whether trying the same call again later can help.
    pub fn is_transient(self) -> bool {
        matches!(self, Failure::Throttled | Failure::Timeout | Failure::Unreachable | Failure::Server)
    }
}

/// The innermost error of a chain, as one line.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut e = err;
    while let Some(inner) = e.source() {
        e = inner;
    }
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// A failed call, classified, with a one-line description.
#[derive(Debug, Clone)]
pub struct CallError {
    pub kind: Failure,
    /// The service's error code, when it sent one.
    pub code: Option<String>,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl CallError {
    /// Classifies an SDK error. Emulators' errors sometimes arrive as
    /// `Unhandled`, so the error code is matched rather than typed variants.
    pub fn from_sdk<E>(err: SdkError<E, aws_sdk_kinesis::config::http::HttpResponse>) -> CallError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = err.code().map(str::to_owned);
        let status = err.raw_response().map(|r| r.status().as_u16());
        let kind = match &err {
            SdkError::TimeoutError(_) => Failure::Timeout,
            SdkError::DispatchFailure(d) if d.is_timeout() => Failure::Timeout,
            SdkError::DispatchFailure(d) if d.is_user() => Failure::Other,
            SdkError::DispatchFailure(_) => Failure::Unreachable,
            SdkError::ResponseError(_) => Failure::Server,
            SdkError::ServiceError(_) => classify_code(code.as_deref(), status),
            _ => Failure::Other,
        };
        let message = match (&code, err.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            _ => match kind {
                Failure::Timeout => "no answer from Kinesis within the time limit".to_owned(),
                // The SDK's own context is a page of connector internals;
                // the innermost cause ("Connection refused") is what helps.
                Failure::Unreachable => format!("cannot reach the Kinesis endpoint ({})", root_cause(&err)),
                _ => DisplayErrorContext(&err).to_string(),
            },
        };
        CallError { kind, code, message }
    }

    /// A call that our own timer gave up on.
    pub fn timed_out() -> CallError {
        CallError {
            kind: Failure::Timeout,
            code: None,
            message: "no answer from Kinesis within the time limit".into(),
        }
    }
}

fn classify_code(code: Option<&str>, status: Option<u16>) -> Failure {
    match code {
        Some(
            "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "LimitExceededException"
            | "KMSThrottlingException"
            | "SlowDown"
            | "RequestLimitExceeded",
        ) => Failure::Throttled,
        Some("ExpiredIteratorException") => Failure::ExpiredIterator,
        Some("ResourceNotFoundException") => Failure::NotFound,
        Some("InvalidArgumentException" | "ValidationException") => Failure::InvalidArgument,
        Some("InternalFailure" | "InternalFailureException" | "ServiceUnavailable" | "ServiceUnavailableException") => {
            Failure::Server
        }
        _ => match status {
            Some(s) if s >= 500 => Failure::Server,
            _ => Failure::Other,
        },
    }
}

/// The 128-bit hash key Kinesis gives a partition key (MD5, big-endian):
/// which shard of a lineage holds a room.
pub fn hash_key(partition_key: &str) -> u128 {
    use md5::{Digest, Md5};
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_classified() {
        assert_eq!(classify_code(Some("ProvisionedThroughputExceededException"), Some(400)), Failure::Throttled);
        assert_eq!(classify_code(Some("ExpiredIteratorException"), Some(400)), Failure::ExpiredIterator);
        assert_eq!(classify_code(Some("ResourceNotFoundException"), Some(400)), Failure::NotFound);
        assert_eq!(classify_code(None, Some(500)), Failure::Server);
        assert_eq!(classify_code(Some("AccessDeniedException"), Some(400)), Failure::Other);
        assert!(Failure::Throttled.is_transient());
        assert!(!Failure::NotFound.is_transient());
    }

    #[test]
    fn hash_key_matches_kinesis() {
        // The emulator put "lobby" on the upper half of a 2-shard stream.
        assert!(hash_key("lobby") > u128::MAX / 2);
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }
}
