//! A throwaway Kafka-protocol broker (tansu, memory storage) for tests and benchmarks.
//!
//! Test-only code, compiled into the unit tests, the integration tests and the benchmarks
//! (`#[path]`), each of which uses part of it.
#![allow(dead_code)]

use anyhow::{bail, Context as _, Result};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// A tansu broker on a free loopback port, killed on drop. The binary is `$TANSU_BIN` or
/// `tansu` on `PATH` (`cargo install tansu --locked --features dynostore`).
pub struct Broker {
    child: Child,
    pub addr: String,
}

impl Broker {
    pub fn start() -> Result<Broker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {bin}; install it with `cargo install tansu --locked --features dynostore`")
            })?;
        let mut broker = Broker {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&broker.addr).is_err() {
            if let Some(status) = broker.child.try_wait()? {
                bail!("tansu exited with {status} before listening");
            }
            if Instant::now() > deadline {
                bail!("tansu did not listen on {} within 20 s", broker.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    /// Stops the broker process without losing its in-memory log (SIGSTOP): an outage.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
