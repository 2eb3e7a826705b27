//! Outgoing `wasi:http` requests to origins outside the host: a service reaches what its
//! `allowed_outbound_hosts` lists, through a real client (TLS verified against Mozilla's roots
//! and `OUTBOUND_CA_FILE`), and nothing else. The misbehave fixture, as product-service,
//! relays `GET <scheme>://<to>/users` (`/call?to=…&via=wasi-http&scheme=…`).

use crate::harness::{assert_error, with_product, Host};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;

/// A certificate authority (PEM), and a certificate it signed for 127.0.0.1 with its key.
fn authority_and_server() -> (String, String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

/// A server on a free loopback port that answers every request with
/// `{"from":"outside","path":…}`: HTTPS with `cert_and_key` (PEM), else HTTP. Its port.
async fn outside_server(cert_and_key: Option<(String, String)>) -> u16 {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = cert_and_key.map(|(cert, key)| {
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let answer = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = format!(r#"{{"from":"outside","path":"{}"}}"#, req.uri().path());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => http.serve_connection(TokioIo::new(stream), answer).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(TokioIo::new(stream), answer).await,
                };
            });
        }
    });
    port
}

/// product-service's relay of `GET <scheme>://<to>/users`.
async fn relay(host: &Host, scheme: &str, to: &str) -> crate::harness::Reply {
    let path = format!("/call?to={to}&via=wasi-http&scheme={scheme}");
    host.send("GET", "product", &path, None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listed_origin_is_reached_and_anything_else_is_denied() {
    let port = outside_server(None).await;
    let allow = (
        "product",
        r#"allowed_outbound_hosts = ["http://127.0.0.1:*"]"#,
    );
    let (host, _comps) = with_product("misbehave.wasm", &[allow], &[]).await;
    let r = relay(&host, "http", &format!("127.0.0.1:{port}")).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        r.json,
        serde_json::json!({"from": "outside", "path": "/users"})
    );
    let counted =
        r#"host_outbound_requests_total{service="product",host="127.0.0.1",outcome="200"}"#;
    assert_eq!(host.metric(counted).await, 1.0);
    // A listed origin where nothing listens: refused, and said so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let r = relay(&host, "http", &format!("127.0.0.1:{closed_port}")).await;
    assert_error(&r, 503);
    let error = r.json["error"].as_str().unwrap();
    assert!(error.contains("ConnectionRefused"), "{error}");
    // The same server by another name, or by another scheme, is not listed.
    for (scheme, to) in [
        ("http", format!("localhost:{port}")),
        ("https", format!("127.0.0.1:{port}")),
    ] {
        let r = relay(&host, scheme, &to).await;
        assert_error(&r, 502);
        assert!(
            r.json["error"].as_str().unwrap().contains("denied"),
            "{:?}",
            r.json
        );
    }
    // Without the list, nothing outside is reached.
    let (host, _comps) = with_product("misbehave.wasm", &[], &[]).await;
    let r = relay(&host, "http", &format!("127.0.0.1:{port}")).await;
    assert_error(&r, 502);
    assert!(
        r.json["error"].as_str().unwrap().contains("denied"),
        "{:?}",
        r.json
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_origins_are_verified_against_the_outbound_ca_file() {
    let (ca, cert, key) = authority_and_server();
    let port = outside_server(Some((cert, key))).await;
    let allow = (
        "product",
        r#"allowed_outbound_hosts = ["https://127.0.0.1:*"]"#,
    );
    let to = format!("127.0.0.1:{port}");
    // Its authority is none of the public ones: refused.
    let (host, _comps) = with_product("misbehave.wasm", &[allow], &[]).await;
    let r = relay(&host, "https", &to).await;
    assert_error(&r, 502);
    let error = r.json["error"].as_str().unwrap();
    assert!(error.contains("TlsCertificateError"), "{error}");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let flags = ["--outbound-ca-file", ca_file.to_str().unwrap()];
    let (host, _comps) = with_product("misbehave.wasm", &[allow], &flags).await;
    let r = relay(&host, "https", &to).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["from"], "outside");
}
