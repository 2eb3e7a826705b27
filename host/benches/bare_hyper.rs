//! The floor under every column of `just bench`: a bare hyper HTTP/1 server on the host's
//! runtime (tokio, multi-threaded), answering every request with 200 `hello` as the `hello`
//! fixture does, with no component, no admission and no metrics. `compare.sh` starts it on
//! `BARE_HYPER_ADDR` (default 127.0.0.1:3100) and loads it with the same wrk as the others.
//! A POST gets an empty 200 once its body is read: an OTLP/HTTP receiver's answer, so that
//! `compare.sh` also uses it as the sink of a host exporting its spans.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

async fn hello(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == hyper::Method::POST {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        let mut resp = Response::new(Full::new(Bytes::new()));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
        return Ok(resp);
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(b"hello")));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // `cargo bench` passes `--bench`: this is a server, not a benchmark run by cargo.
    if std::env::args().any(|a| a == "--bench") && std::env::var_os("BARE_HYPER_ADDR").is_none() {
        return Ok(());
    }
    let addr = std::env::var("BARE_HYPER_ADDR").unwrap_or_else(|_| "127.0.0.1:3100".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}
