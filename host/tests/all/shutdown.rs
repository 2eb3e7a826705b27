//! SIGTERM: in-flight requests finish with their normal answer, the host exits 0, nothing is lost.

use crate::harness::Host;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_finishes_in_flight_work_and_loses_nothing() {
    // Every call into user-service takes 300 ms, so requests are surely in flight at SIGTERM.
    let host = Host::edited(&[("user", r#"latency = "300ms""#)], &[]).await;
    let url = host.url("gateway", "/api/users");
    let mut clients = Vec::new();
    for t in 0..4 {
        // A new connection per request: after SIGTERM a request is either refused at connect
        // or answered in full; anything else (a reset, a cut-off answer) fails the test.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let mut created = 0;
            for i in 0.. {
                let body = json!({"name": "T", "email": format!("t{t}-{i}@ex.com")});
                match http.post(&url).json(&body).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        assert_eq!(
                            status,
                            201,
                            "an answered request failed: {}",
                            r.text().await.unwrap()
                        );
                        created += 1;
                    }
                    // After SIGTERM the host stops accepting: refused connections are expected.
                    Err(e) if e.is_connect() => break,
                    Err(e) => panic!("a request was cut off: {e:?}"),
                }
            }
            created
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let data = host.data.clone();
    let (status, keep) = tokio::task::spawn_blocking(move || host.terminate())
        .await
        .unwrap();
    let mut created = 0;
    for c in clients {
        created += c.await.unwrap();
    }
    assert!(status.success(), "exit status {status}");
    assert!(created >= 4, "only {created} users created before SIGTERM");

    let host = Host::start_with(Some(&data), &[]).await;
    let users = host.get("/api/users").await.json;
    assert_eq!(
        users.as_array().unwrap().len(),
        created,
        "users stored != 201s answered"
    );
    drop(keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_the_signal_right_after_it_still_drains() {
    let host = Host::edited(&[("user", r#"latency = "1500ms""#)], &[]).await;
    let (http, url) = (host.http.clone(), host.url("gateway", "/api/users"));
    let in_flight = tokio::spawn(async move { http.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _keep) = tokio::task::spawn_blocking(move || host.terminate_with(2))
        .await
        .unwrap();
    let answer = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was cut off");
    assert_eq!(answer.status(), 200);
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_stops_at_once_instead_of_waiting_out_the_grace() {
    let host = Host::edited(
        &[("user", r#"latency = "60s""#)],
        &["--shutdown-grace", "120s"],
    )
    .await;
    let (http, url) = (host.http.clone(), host.url("gateway", "/api/users"));
    let in_flight = tokio::spawn(async move { http.get(url).send().await });
    // Past the window in which a signal counts as a copy of the first.
    let (status, took) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(300));
        host.terminate_twice(Duration::from_millis(1500))
    })
    .await
    .unwrap();
    // Not the minute the request still had, nor the grace period.
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after the second signal"
    );
    assert!(status.success(), "{status}");
    in_flight.abort();
}
