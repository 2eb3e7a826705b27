//! Outgoing `wasi:http` requests (0.2 `outgoing-handler`, 0.3 `client`) to origins outside the
//! host, under the service's `allowed_outbound_hosts`.
//!
//! A request leaves through one shared client (HTTP/1.1, TLS verified against Mozilla's roots
//! and those of `OUTBOUND_CA_FILE`), with connect, first-byte and between-bytes timeouts (the
//! guest's own when shorter), a request body of at most 1 MiB, and a count per service and
//! destination host.

use crate::metrics;
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use platform_contract::MAX_BODY;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The client every service's outgoing requests to the outside share.
#[derive(Clone)]
pub struct OutboundClient {
    client: Client<Connector, Full<Bytes>>,
    /// The longest a request waits for its connection, first byte, or next bytes.
    timeout: Duration,
}

impl OutboundClient {
    /// A client trusting Mozilla's root authorities and those of `ca_file` (PEM).
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<OutboundClient> {
        let tls = crate::types::tls::client_config(ca_file, "OUTBOUND_CA_FILE")
            .context("TLS for outgoing requests")?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(OutboundClient { client, timeout })
    }

    /// Sends `request` for `service` to `destination` (the allowlist entry's host, as the
    /// metrics name it): the response, its body passed on as it arrives.
    pub async fn send(
        &self,
        service: &str,
        destination: &str,
        request: hyper::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<hyper::Response<WasiBody>, HttpError> {
        let outcome = self.exchange(request, options).await;
        let label = match &outcome {
            Ok(resp) => resp.status().as_u16().to_string(),
            Err(e) => format!("{e:?}")
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or("error")
                .to_string(),
        };
        let labels = [
            ("service", service),
            ("host", destination),
            ("outcome", &label),
        ];
        metrics::get()
            .outbound
            .get_or_create(&metrics::labels(labels))
            .inc();
        outcome
    }

    async fn exchange(
        &self,
        request: hyper::Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<hyper::Response<WasiBody>, HttpError> {
        let options = options.unwrap_or_default();
        let shorter = |guest: Option<Duration>| guest.map_or(self.timeout, |g| g.min(self.timeout));
        let (parts, body) = request.into_parts();
        let request = hyper::Request::from_parts(parts, Full::new(request_body(body).await?));
        // The connector's own timeout is the host's; a guest's shorter one bounds the wait for
        // the response head, which includes connecting.
        let first_byte = shorter(options.first_byte_timeout).min(shorter(options.connect_timeout));
        let resp = tokio::time::timeout(first_byte, self.client.request(request))
            .await
            .map_err(|_| HttpError::ConnectionReadTimeout)?
            .map_err(|e| failure(&e))?;
        let between = shorter(options.between_bytes_timeout);
        Ok(resp.map(|body| BetweenBytes::new(body, between).boxed_unsync()))
    }
}

/// A guest's outgoing request body, whole: at most 1 MiB (`MAX_BODY`), as to a peer service.
pub async fn request_body(body: WasiBody) -> Result<Bytes, HttpError> {
    Ok(Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|_| HttpError::HttpRequestBodySize(None))?
        .to_bytes())
}

/// What a failed exchange means to the guest, from the first cause that says.
fn failure(e: &hyper_util::client::legacy::Error) -> HttpError {
    use std::io::ErrorKind;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let tls = |tls: &rustls::Error| match tls {
        rustls::Error::InvalidCertificate(_) => HttpError::TlsCertificateError,
        _ => HttpError::TlsProtocolError,
    };
    while let Some(c) = cause {
        if let Some(e) = c.downcast_ref::<rustls::Error>() {
            return tls(e);
        }
        if c.to_string().starts_with("dns error") {
            return HttpError::DestinationNotFound;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(e) = wrapped_tls(io) {
                return tls(e);
            }
            match io.kind() {
                ErrorKind::ConnectionRefused => return HttpError::ConnectionRefused,
                ErrorKind::TimedOut => return HttpError::ConnectionTimeout,
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => {
                    return HttpError::ConnectionTerminated
                }
                _ => {}
            }
        }
        cause = c.source();
    }
    if e.is_connect() {
        HttpError::DestinationUnavailable
    } else {
        HttpError::HttpProtocolError
    }
}

/// The TLS error inside `io`: tokio-rustls wraps it in an io::Error (the connector wraps that
/// in another), whose `source` skips it.
fn wrapped_tls(io: &std::io::Error) -> Option<&rustls::Error> {
    let inner = io.get_ref()?;
    (inner.downcast_ref::<rustls::Error>())
        .or_else(|| inner.downcast_ref::<std::io::Error>().and_then(wrapped_tls))
}

/// A response body that fails when its next bytes take longer than `limit`.
struct BetweenBytes {
    body: hyper::body::Incoming,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl BetweenBytes {
    fn new(body: hyper::body::Incoming, limit: Duration) -> BetweenBytes {
        BetweenBytes {
            body,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl hyper::body::Body for BetweenBytes {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.limit;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(|_| HttpError::HttpResponseIncomplete)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}
