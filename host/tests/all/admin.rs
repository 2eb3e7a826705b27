//! The admin listener: health, readiness and what is loaded.

use crate::harness::{components_dir, Host};
use sha2::{Digest, Sha256};

#[tokio::test]
async fn admin_reports_health_readiness_and_components() {
    let host = Host::start().await;
    let h = host.admin_get("/healthz").await;
    assert_eq!(h.status, 200);
    let r = host.admin_get("/readyz").await;
    assert_eq!((r.status, r.json["ready"].as_bool()), (200, Some(true)));

    let comps = host.admin_get("/components").await.json;
    let comps = comps.as_array().unwrap();
    let names: Vec<_> = comps.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["gateway", "user", "product", "order"]);
    for c in comps {
        let file = components_dir().join(format!("{}.wasm", c["name"].as_str().unwrap()));
        let digest = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
        assert_eq!(c["sha256"], digest.as_str());
        assert!(c["port"].as_u64().unwrap() > 0);
        assert!(c["path"].as_str().unwrap().ends_with(".wasm"));
        assert!(humantime::parse_rfc3339(c["loaded_at"].as_str().unwrap()).is_ok());
    }
    assert_eq!(host.admin_get("/nope").await.status, 404);
    // Admin routes are not reachable on service ports.
    assert_eq!(host.get("/components").await.status, 404);
    assert_eq!(host.get("/healthz").await.status, 404);
}
