//! `wasi:cli/stderr`: a guest's stderr, line by line into the host's log, tagged with the
//! service and the request, and capped per invocation.
//!
//! Inheriting the host's stderr would let any guest write without bound and interleave with
//! the host's own log lines, untagged.

use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes of stderr one invocation may put in the log; the rest is counted and dropped.
pub const PER_INVOCATION: usize = 64 << 10;

/// Longest line logged as one; longer ones are split.
const MAX_LINE: usize = 4 << 10;

/// One instance's stderr. Clones share it: the store keeps one to start each invocation.
#[derive(Clone)]
pub struct GuestStderr(Arc<Mutex<Lines>>);

struct Lines {
    service: Arc<str>,
    request_id: String,
    line: Vec<u8>,
    /// Bytes this invocation wrote, logged or not.
    written: usize,
}

impl GuestStderr {
    pub fn new(service: Arc<str>) -> GuestStderr {
        GuestStderr(Arc::new(Mutex::new(Lines {
            service,
            request_id: String::new(),
            line: Vec::new(),
            written: 0,
        })))
    }

    /// Tags what follows with `request_id`, ending what an earlier invocation left.
    pub fn begin(&self, request_id: &str) {
        let mut lines = self.0.lock().unwrap();
        lines.finish();
        request_id.clone_into(&mut lines.request_id);
        lines.written = 0;
    }

    /// Ends the invocation's output: its last partial line, and how much was dropped.
    pub fn end(&self) {
        self.0.lock().unwrap().finish();
    }

    fn write(&self, bytes: &[u8]) {
        self.0.lock().unwrap().write(bytes);
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Lines {
    fn write(&mut self, bytes: &[u8]) {
        let room = PER_INVOCATION.saturating_sub(self.written);
        self.written = self.written.saturating_add(bytes.len());
        for &b in &bytes[..bytes.len().min(room)] {
            if b == b'\n' {
                self.emit();
            } else {
                self.line.push(b);
                if self.line.len() >= MAX_LINE {
                    self.emit();
                }
            }
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        tracing::info!(target: "guest", service = %self.service, request_id = %self.request_id, "{line}");
        self.line.clear();
    }

    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
        if self.written > PER_INVOCATION {
            tracing::warn!(
                target: "guest",
                service = %self.service,
                request_id = %self.request_id,
                dropped = self.written - PER_INVOCATION,
                "guest stderr over {PER_INVOCATION} bytes in one invocation; the rest was dropped"
            );
        }
        self.written = 0;
    }
}

impl IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStderr {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestStderr {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestStderr::write(self, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        // Always room: past the cap bytes are dropped, never refused (a guest that cannot
        // write its stderr may trap).
        Ok(PER_INVOCATION)
    }
}

impl AsyncWrite for GuestStderr {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        GuestStderr::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The host's log, as text.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
        type Writer = Log;
        fn make_writer(&'a self) -> Log {
            self.clone()
        }
    }

    /// What `run` puts in the log: the guest's lines (their text), and the warnings.
    fn logged(run: impl FnOnce()) -> (Vec<String>, Vec<String>) {
        let log = Log::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let (mut lines, mut warnings) = (Vec::new(), Vec::new());
        for line in text.lines() {
            if line.contains("WARN") {
                warnings.push(line.to_string());
            } else if let Some((_, rest)) = line.split_once("guest: ") {
                let (text, fields) = rest.rsplit_once(" service=").expect("tagged");
                assert!(fields.starts_with("svc request_id="), "{line}");
                lines.push(text.to_string());
            }
        }
        (lines, warnings)
    }

    #[test]
    fn lines_are_split_and_an_invocation_past_the_cap_is_cut() {
        let (lines, warnings) = logged(|| {
            let err = GuestStderr::new("svc".into());
            err.begin("r1");
            err.write(b"one\ntw");
            err.write(b"o\n");
            err.write(&vec![b'x'; 3 * MAX_LINE]);
            err.write(&vec![b'y'; 10 * PER_INVOCATION]);
            err.begin("r2");
            err.write(b"next\n");
            err.end();
        });
        assert_eq!(lines[..2], ["one", "two"]);
        assert_eq!(
            lines[2..5],
            vec!["x".repeat(MAX_LINE); 3],
            "long lines come in pieces"
        );
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
        let ys: usize = lines.iter().map(|l| l.matches('y').count()).sum();
        assert_eq!(
            ys,
            PER_INVOCATION - 8 - 3 * MAX_LINE,
            "the cap holds the rest back"
        );
        assert_eq!(
            lines.last().unwrap(),
            "next",
            "the next invocation has its own cap"
        );
        let dropped = 8 + 3 * MAX_LINE + 10 * PER_INVOCATION - PER_INVOCATION;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains(&format!("dropped={dropped}")),
            "{warnings:?}"
        );
    }
}
