//! Starts the host on ephemeral ports with a temporary data dir, and talks to it.

use crate::broker::free_port;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn components_dir() -> PathBuf {
    let dir = std::env::var_os("COMPONENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/components"));
    assert!(
        dir.join("gateway.wasm").exists(),
        "no built components in {}: run `just build` first",
        dir.display()
    );
    dir
}

/// Test fixtures built by `just build-fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    let file = components_dir().join("../fixtures").join(name);
    assert!(
        file.exists(),
        "no fixture {}: run `just build-fixtures`",
        file.display()
    );
    file
}

/// A private copy of the built components, for tests that replace files in it.
pub fn components_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(components_dir()).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_some_and(|e| e == "wasm") {
            std::fs::copy(&file, dir.path().join(file.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// A host whose product-service runs the fixture `fixture` (e.g. `misbehave.wasm`), started
/// with `extra` flags. The returned dir holds the components; keep it as long as the host.
pub async fn with_product(
    fixture_file: &str,
    edits: &[(&str, &str)],
    extra: &[&str],
) -> (Host, tempfile::TempDir) {
    with_fixture_as("product", fixture_file, edits, extra).await
}

/// A host whose `service` runs the fixture `fixture_file` instead of its seed component.
pub async fn with_fixture_as(
    service: &str,
    fixture_file: &str,
    edits: &[(&str, &str)],
    extra: &[&str],
) -> (Host, tempfile::TempDir) {
    let comps = components_copy();
    let target = comps.path().join(format!("{service}.wasm"));
    std::fs::copy(fixture(fixture_file), target).unwrap();
    let host = Host::start_edited(comps.path(), None, edits, extra).await;
    (host, comps)
}

/// The repository's `services.toml` with every port 0 (any free port) and `edits` applied:
/// `(service, "key = value")` sets that key of `[service.NAME]`, replacing it if present; a
/// service the file does not have gets a section of its own.
pub fn manifest(edits: &[(&str, &str)]) -> String {
    let seed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../services.toml")).unwrap();
    let mut lines: Vec<String> = seed
        .lines()
        .map(|l| match l.strip_prefix("port = ") {
            Some(_) => "port = 0".to_string(),
            None => l.to_string(),
        })
        .collect();
    for (service, setting) in edits {
        let key = setting.split('=').next().unwrap().trim();
        let section = format!("[service.{service}]");
        let header = match lines.iter().position(|l| l.trim() == section) {
            Some(header) => header,
            None => {
                lines.extend([String::new(), section]);
                lines.len() - 1
            }
        };
        let end = lines[header + 1..]
            .iter()
            .position(|l| l.starts_with('['))
            .map_or(lines.len(), |i| header + 1 + i);
        let existing =
            (header + 1..end).find(|&i| lines[i].split('=').next().map(str::trim) == Some(key));
        match existing {
            Some(i) => lines[i] = setting.to_string(),
            None => lines.insert(header + 1, setting.to_string()),
        }
    }
    lines.join("\n")
}

/// Edits that add `counter`: the misbehave fixture on a free port, handling `user-created` in
/// its own consumer group and counting each event it handled by `event-id`
/// ([`Host::deliveries`]). Its component comes from [`components_with_counter`].
pub const COUNTER: [(&str, &str); 3] = [
    ("counter", "component = \"counter.wasm\""),
    ("counter", "port = 0"),
    (
        "counter",
        "subscribe = [{ topic = \"user-created\", group = \"counter\" }]",
    ),
];

/// A copy of the built components with the misbehave fixture as `counter.wasm`.
pub fn components_with_counter() -> tempfile::TempDir {
    let comps = components_copy();
    std::fs::copy(fixture("misbehave.wasm"), comps.path().join("counter.wasm")).unwrap();
    comps
}

/// A raw connection to `port` that has sent `bytes` and then sends nothing more: a client
/// stalled in the middle of its headers or body.
pub async fn stalled(port: u16, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(bytes).await.unwrap();
    conn
}

pub struct Host {
    child: Child,
    pub admin: String,
    /// `--admin-token`, when the test passed one.
    admin_token: Option<String>,
    pub ports: HashMap<String, u16>,
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
}

impl Host {
    pub async fn start() -> Host {
        Host::start_with(None, &[]).await
    }

    /// `data`: reuse a data dir (for restarts); `extra`: more command-line flags.
    pub async fn start_with(data: Option<&Path>, extra: &[&str]) -> Host {
        Host::start_in(&components_dir(), data, extra).await
    }

    /// The seed services with the manifest changed by `edits` (see [`manifest`]).
    pub async fn edited(edits: &[(&str, &str)], extra: &[&str]) -> Host {
        Host::start_edited(&components_dir(), None, edits, extra).await
    }

    /// Like `start_with`, loading the components from `components`.
    pub async fn start_in(components: &Path, data: Option<&Path>, extra: &[&str]) -> Host {
        Host::start_edited(components, data, &[], extra).await
    }

    /// Like `start_in`, with the seed manifest changed by `edits` (see [`manifest`]).
    pub async fn start_edited(
        components: &Path,
        data: Option<&Path>,
        edits: &[(&str, &str)],
        extra: &[&str],
    ) -> Host {
        let (tmp, data) = match data {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::tempdir().unwrap();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let manifest_file = data.join("services.toml");
        std::fs::write(&manifest_file, manifest(edits)).unwrap();
        // The admin address `extra` gives (`0.0.0.0:PORT` is reached on 127.0.0.1), or ours.
        let given = extra
            .iter()
            .position(|a| *a == "--admin-addr")
            .and_then(|i| extra.get(i + 1));
        let admin = match given {
            Some(addr) => addr.replace("0.0.0.0", "127.0.0.1"),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("host.log"))
            .unwrap();
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compile-cache");
        let child = Command::new(env!("CARGO_BIN_EXE_host"))
            .arg("--components-dir")
            .arg(components)
            .arg("--data-dir")
            .arg(&data)
            .args(
                (!extra.contains(&"--compile-cache"))
                    .then_some(["--compile-cache".as_ref(), cache.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(
                given
                    .is_none()
                    .then_some(["--admin-addr", &admin])
                    .into_iter()
                    .flatten(),
            )
            .args(
                (!extra.contains(&"--max-instances"))
                    .then_some(["--max-instances", "128"])
                    .into_iter()
                    .flatten(),
            )
            // A test that brings its own manifest says so in `extra`.
            .args(
                (!extra.contains(&"--manifest"))
                    .then_some(["--manifest".as_ref(), manifest_file.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(["--retry-backoff", "20ms", "--retry-backoff-max", "100ms"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting the host binary");
        let admin_token = extra
            .iter()
            .position(|a| *a == "--admin-token")
            .and_then(|i| extra.get(i + 1))
            .map(|t| t.to_string());
        let mut host = Host {
            child,
            admin,
            admin_token,
            ports: HashMap::new(),
            data,
            _tmp: tmp,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        host.wait_ready().await;
        host.refresh_ports().await;
        host
    }

    /// The services of `GET /components`, one JSON object each.
    pub async fn services(&self) -> Vec<Value> {
        let listed = self.admin_get("/components").await.json;
        listed["services"].as_array().cloned().unwrap_or_default()
    }

    /// `ports` as the host has them now (after a manifest change).
    pub async fn refresh_ports(&mut self) {
        self.ports.clear();
        for c in self.services().await {
            if let Some(port) = c["port"].as_u64() {
                self.ports
                    .insert(c["name"].as_str().unwrap().to_string(), port as u16);
            }
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "host exited with {status} during start-up; log:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = self
                .http
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "host not ready in time; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The host process's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }

    /// The last `lines` lines of the host's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("host.log")).unwrap_or_default()
    }

    /// Waits until a line of the host's log contains every one of `needles`; panics after
    /// `within`, with the log's end.
    pub async fn logged(&self, needles: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        while !(self.log().lines()).any(|l| needles.iter().all(|n| l.contains(n))) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}; the log ends:\n{}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[service])
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        let mut get = self.http.get(format!("http://{}{path}", self.admin));
        if let Some(token) = &self.admin_token {
            get = get.bearer_auth(token);
        }
        reply(get.send().await.unwrap()).await
    }

    /// The admin listener's Prometheus text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the metric line starting with `series` (name and labels); 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(series))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }

    pub async fn send(&self, method: &str, service: &str, path: &str, body: Option<&str>) -> Reply {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.url(service, path));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        reply(req.send().await.unwrap()).await
    }

    /// How many deliveries of `event_id` the `counter` service ([`COUNTER`]) handled, each
    /// committed: more than one is a redelivery.
    pub async fn deliveries(&self, event_id: &str) -> u64 {
        self.deliveries_at("counter", event_id).await
    }

    /// [`Host::deliveries`] of `service`, another service running the misbehave fixture.
    pub async fn deliveries_at(&self, service: &str, event_id: &str) -> u64 {
        let path = format!("/deliveries/{event_id}");
        let r = self.send("GET", service, &path, None).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        r.json["count"].as_u64().unwrap()
    }

    /// Waits until `counter` handled `event_id` (at most `within`); how many times by then.
    pub async fn counted(&self, event_id: &str, within: Duration) -> u64 {
        self.counted_at("counter", event_id, within).await
    }

    /// [`Host::counted`] of `service`, another service running the misbehave fixture.
    pub async fn counted_at(&self, service: &str, event_id: &str, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let n = self.deliveries_at(service, event_id).await;
            if n > 0 {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{service} never handled {event_id}; the host's log ends:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", "gateway", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send("POST", "gateway", path, Some(&body.to_string()))
            .await
    }

    /// Polls `path` on the gateway until `done` holds or `within` passes.
    pub async fn eventually(
        &self,
        path: &str,
        within: Duration,
        done: impl Fn(&Reply) -> bool,
    ) -> Reply {
        self.eventually_at("gateway", path, within, done).await
    }

    /// [`Host::eventually`] on `service`.
    pub async fn eventually_at(
        &self,
        service: &str,
        path: &str,
        within: Duration,
        done: impl Fn(&Reply) -> bool,
    ) -> Reply {
        let deadline = Instant::now() + within;
        loop {
            let r = self.send("GET", service, path, None).await;
            if done(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Places an order of `product_id` for `user_id`, retrying while order-service answers 422 because the
    /// user's event has not reached its cache yet. Panics after `within`.
    pub async fn order_when_cached(
        &self,
        user_id: u64,
        product_id: u64,
        within: Duration,
    ) -> Reply {
        let deadline = Instant::now() + within;
        loop {
            let body =
                serde_json::json!({"userId": user_id, "productId": product_id, "quantity": 1});
            let r = self.post("/api/orders", &body).await;
            if r.status != 422 {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "user {user_id} never reached order-service's cache; the host's log ends:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit (at most 30 s).
    pub fn terminate(self) -> (std::process::ExitStatus, Option<tempfile::TempDir>) {
        self.terminate_with(1)
    }

    /// `copies` SIGTERMs 100 ms apart (as a process group's signal forwarded by a wrapper
    /// arrives), then waits for the exit (at most 30 s).
    pub fn terminate_with(
        mut self,
        copies: usize,
    ) -> (std::process::ExitStatus, Option<tempfile::TempDir>) {
        for i in 0..copies {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self._tmp.take());
            }
            assert!(Instant::now() < deadline, "host did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and after `after` (the host still running: it is draining) another; how long
    /// the host took to exit after the second (at most 30 s).
    pub fn terminate_twice(mut self, after: Duration) -> (std::process::ExitStatus, Duration) {
        let term = |child: &std::process::Child| {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        };
        term(&self.child);
        std::thread::sleep(after);
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the host exited before the second signal: nothing was draining"
        );
        term(&self.child);
        let second = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, second.elapsed());
            }
            assert!(
                second.elapsed() < Duration::from_secs(30),
                "host did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: what a crash looks like to the data dir.
    pub fn kill(mut self) -> Option<tempfile::TempDir> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self._tmp.take()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn reply(r: reqwest::Response) -> Reply {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        json,
    }
}

/// Asserts the `{"error": ...}` shape and content type of an error reply.
pub fn assert_error(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "unexpected reply {:?}", r.json);
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(
        r.json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error body {:?}",
        r.json
    );
}

/// Stops load clients that run until `stop`, each returning how many requests it sent: their
/// total, once it is sure that none of them failed (`failures`).
pub async fn stop_clients(
    stop: &std::sync::atomic::AtomicBool,
    clients: Vec<tokio::task::JoinHandle<u32>>,
    failures: &std::sync::Mutex<Vec<String>>,
) -> u32 {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for c in clients {
        sent += c.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed of {sent}: {failures:?}",
        failures.len()
    );
    sent
}
