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

    #[test]
    fn lines_are_split_and_an_invocation_past_the_cap_is_cut() {
        let err = GuestStderr::new("svc".into());
        err.begin("r1");
        err.write(b"one\ntw");
        err.write(b"o\n");
        err.write(&vec![b'x'; 3 * MAX_LINE]);
        {
            let lines = err.0.lock().unwrap();
            assert!(
                lines.line.len() < MAX_LINE,
                "long lines are emitted in pieces"
            );
            assert_eq!(lines.written, 8 + 3 * MAX_LINE);
        }
        err.write(&vec![b'y'; 10 * PER_INVOCATION]);
        {
            let lines = err.0.lock().unwrap();
            assert!(lines
                .line
                .iter()
                .all(|&b| b != b'y' || lines.line.len() < MAX_LINE));
            assert_eq!(lines.written, 8 + 3 * MAX_LINE + 10 * PER_INVOCATION);
        }
        err.begin("r2");
        let lines = err.0.lock().unwrap();
        assert_eq!((lines.written, lines.line.len()), (0, 0));
        assert_eq!(lines.request_id, "r2");
    }
}
