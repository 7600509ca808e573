//! kinesis-mock (npm `kinesis-local`) for tests: one emulator process per
//! test on free loopback ports, killed on drop; a unique stream per test;
//! and the server config that points an in-process instance at it.
//!
//! Needs `node` and the repo's `node_modules` (`scripts/setup` or `npm ci`).

use super::{test_config, TestServer, WAIT};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{ScalingType, StreamStatus};
use aws_sdk_kinesis::Client;
use server::config::{BackendKind, Config};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

/// Region every test uses (the emulator namespaces streams by region).
pub const REGION: &str = "us-west-1";
/// How long the emulator may take to answer its health check (it takes
/// 1-3 s idle, longer on a busy 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Sets the AWS environment every SDK client in the test process reads
/// (region, dummy credentials, no instance-metadata probing). Once, before
/// any client exists.
pub fn aws_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // RUST_LOG=server=debug shows the server's logs in test output.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        // Set once, guarded by `Once`, before any test thread reads them.
        std::env::set_var("AWS_REGION", REGION);
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::remove_var("AWS_ENDPOINT_URL");
        std::env::remove_var("AWS_ENDPOINT_URL_KINESIS");
    });
}

/// A kinesis-mock process.
pub struct Emulator {
    child: Option<Child>,
    pub port: u16,
    tls_port: u16,
    /// Data directory when started with persistence.
    persist: Option<PathBuf>,
    pub log: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kinesis-chat-tests-{}", std::process::id())).join(name);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

impl Emulator {
    /// Starts an emulator without persistence.
    pub async fn start() -> Emulator {
        Self::launch(false).await
    }

    /// Starts an emulator that persists its data often, so it can be
    /// killed and restarted without losing acknowledged records.
    pub async fn start_persistent() -> Emulator {
        Self::launch(true).await
    }

    async fn launch(persist: bool) -> Emulator {
        aws_env();
        let port = free_port();
        let tls_port = free_port();
        let dir = scratch_dir(&format!("emu-{port}"));
        let mut e = Emulator {
            child: None,
            port,
            tls_port,
            persist: persist.then(|| dir.join("data")),
            log: dir.join("kinesis-mock.log"),
        };
        e.spawn();
        e.wait_healthy().await;
        e
    }

    fn spawn(&mut self) {
        let main = repo_root().join("node_modules/kinesis-local/main.js");
        assert!(main.exists(), "{} is missing: run scripts/setup (or npm ci) at the repo root", main.display());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("emulator log");
        let mut cmd = Command::new("node");
        cmd.arg(&main)
            .env("KINESIS_MOCK_CERT_PATH", repo_root().join("node_modules/kinesis-local/server.json"))
            .env("KINESIS_MOCK_PLAIN_PORT", self.port.to_string())
            .env("KINESIS_MOCK_TLS_PORT", self.tls_port.to_string())
            .env("AWS_REGION", REGION)
            .env("LOG_LEVEL", "WARN");
        for var in [
            "CREATE_STREAM_DURATION",
            "DELETE_STREAM_DURATION",
            "SPLIT_SHARD_DURATION",
            "MERGE_SHARDS_DURATION",
            "UPDATE_SHARD_COUNT_DURATION",
            "REGISTER_STREAM_CONSUMER_DURATION",
            "DEREGISTER_STREAM_CONSUMER_DURATION",
        ] {
            cmd.env(var, "0ms");
        }
        if let Some(path) = &self.persist {
            std::fs::create_dir_all(path).expect("persist dir");
            cmd.env("SHOULD_PERSIST_DATA", "true")
                .env("LOAD_DATA_IF_EXISTS", "true")
                .env("PERSIST_PATH", path)
                .env("PERSIST_INTERVAL", "100ms");
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        self.child = Some(cmd.spawn().expect("start node (is Node.js installed?)"));
    }

    async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/healthcheck", self.port);
        let started = std::time::Instant::now();
        loop {
            let ok = tokio::time::timeout(Duration::from_secs(2), http.get(&url).send())
                .await
                .is_ok_and(|r| r.is_ok_and(|r| r.status().is_success()));
            if ok {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "kinesis-mock did not become healthy within {START_TIMEOUT:?}; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process (like a crash: SIGKILL).
    pub fn kill(&mut self) {
        // kinesis-mock rewrites its data file in place (truncate, then
        // write) every PERSIST_INTERVAL, so a SIGKILL can land between the
        // two and leave an empty file that it then fails to load. Callers
        // let it persist first; keep that complete copy and put it back if
        // the kill caught a rewrite half done.
        let data = self.persist.as_ref().map(|dir| dir.join("kinesis-data.json"));
        // Three reads, keeping the longest, in case one meets a rewrite.
        let snapshot = data
            .as_ref()
            .and_then(|f| (0..3).filter_map(|_| std::fs::read(f).ok()).max_by_key(Vec::len))
            .filter(|b| !b.is_empty());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let (Some(file), Some(snapshot)) = (data, snapshot) {
            let now = std::fs::read(&file).unwrap_or_default();
            if now.len() < snapshot.len() {
                std::fs::write(&file, &snapshot).expect("restore the emulator's data file");
            }
        }
    }

    /// Starts the process again on the same ports (and data, if persistent).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy().await;
    }

    /// An SDK client for the test's own calls (create, reshard, foreign puts).
    pub async fn client(&self) -> Client {
        sdk_client(&self.endpoint()).await
    }

    /// Creates a uniquely named stream and waits until it is ACTIVE.
    pub async fn create_stream(&self, prefix: &str, shards: i32) -> String {
        let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let c = self.client().await;
        c.create_stream().stream_name(&name).shard_count(shards).send().await.expect("CreateStream");
        wait_active(&c, &name).await;
        name
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.log.parent() {
            // Keep the log of a failed test for a look; tidy up otherwise.
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(dir);
            } else {
                eprintln!("kinesis-mock log kept at {}", self.log.display());
            }
        }
    }
}

/// An SDK client for `endpoint`, with timeouts so a test never hangs.
pub async fn sdk_client(endpoint: &str) -> Client {
    aws_env();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest()).endpoint_url(endpoint).load().await;
    let conf = aws_sdk_kinesis::config::Builder::from(&sdk)
        .timeout_config(
            aws_sdk_kinesis::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(20))
                .build(),
        )
        .build();
    Client::from_conf(conf)
}

/// Waits until the stream is ACTIVE (the emulator applies even 0 ms
/// transitions asynchronously).
pub async fn wait_active(c: &Client, stream: &str) {
    let started = std::time::Instant::now();
    loop {
        let out = c.describe_stream_summary().stream_name(stream).send().await;
        if let Ok(out) = out {
            if out.stream_description_summary().map(|s| s.stream_status()) == Some(&StreamStatus::Active) {
                return;
            }
        }
        assert!(started.elapsed() < WAIT * 2, "stream {stream} did not become ACTIVE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reshards to `target` shards (uniform scaling) and waits for ACTIVE.
pub async fn update_shard_count(c: &Client, stream: &str, target: i32) {
    c.update_shard_count()
        .stream_name(stream)
        .target_shard_count(target)
        .scaling_type(ScalingType::UniformScaling)
        .send()
        .await
        .expect("UpdateShardCount");
    wait_active(c, stream).await;
}

/// Puts one record as some other producer would.
pub async fn put_raw(c: &Client, stream: &str, partition_key: &str, data: Vec<u8>) -> (String, String) {
    let out = c
        .put_record()
        .stream_name(stream)
        .partition_key(partition_key)
        .data(Blob::new(data))
        .send()
        .await
        .expect("PutRecord");
    (out.shard_id().to_owned(), out.sequence_number().to_owned())
}

/// Server settings for Kinesis tests: fast timeouts, quick shard
/// discovery, readiness that notices trouble within a few seconds.
pub fn kinesis_config(endpoint: &str, stream: &str) -> Config {
    aws_env();
    let mut c = test_config();
    c.backend = BackendKind::Kinesis;
    c.stream = stream.to_owned();
    c.kinesis_endpoint = Some(endpoint.to_owned());
    // Generous: the emulator slows down a lot on a busy 2-core machine.
    c.kinesis_call_timeout = Duration::from_secs(3);
    c.kinesis_put_budget = Duration::from_secs(10);
    c.kinesis_list_shards_interval = Duration::from_secs(2);
    c.kinesis_stuck_after = Duration::from_secs(4);
    c.kinesis_max_poll_interval = Duration::from_secs(2);
    c
}

/// Starts an instance and waits until `/readyz` says it is ready.
pub async fn start_ready(config: Config) -> TestServer {
    let s = TestServer::start(config).await;
    wait_ready(&s).await;
    s
}

/// Polls `/readyz` until 200.
pub async fn wait_ready(s: &TestServer) {
    wait_readyz(s, 200).await;
}

/// Polls `/readyz` until it answers `status`; returns its body.
pub async fn wait_readyz(s: &TestServer, status: u16) -> serde_json::Value {
    let started = std::time::Instant::now();
    loop {
        let (got, body) = s.get_json("/readyz").await;
        if got == status {
            return body;
        }
        assert!(started.elapsed() < WAIT * 2, "/readyz stayed {got} ({body}), expected {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two room names whose partition keys land on different shards of a
/// 2-shard stream (lower and upper half of the hash range).
pub fn rooms_on_two_shards() -> (String, String) {
    use server::backend::kinesis::client::hash_key;
    let half = u128::MAX / 2;
    let names = (0..).map(|i| format!("room-{i}"));
    let low = names.clone().find(|n| hash_key(n) <= half).expect("a low room");
    let high = names.clone().find(|n| hash_key(n) > half).expect("a high room");
    (low, high)
}

/// The value of a metric line `name{labels} value` (summed over label
/// sets containing `label_filter`), from `/metrics`.
pub async fn metric(s: &TestServer, name: &str, label_filter: &str) -> f64 {
    let (_, text) = s.get_text("/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// POSTs like the clients do: with a `client_id`, retried after a 503
/// (the emulator stalls for seconds on a busy machine) until accepted.
pub async fn send_retrying(s: &TestServer, room: &str, author: &str, text: &str) -> (app::ChatMessage, String) {
    let body = serde_json::json!({"room": room, "author": author, "text": text,
                                  "client_id": uuid::Uuid::new_v4().to_string()});
    let started = std::time::Instant::now();
    loop {
        let (status, answer) = s.post(&body).await;
        match status {
            200 | 201 => {
                let message: app::ChatMessage = serde_json::from_value(answer["message"].clone()).expect("message");
                return (message, answer["cursor"].as_str().expect("cursor").to_owned());
            }
            503 if started.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(300)).await,
            _ => panic!("POST answered {status}: {answer}"),
        }
    }
}
