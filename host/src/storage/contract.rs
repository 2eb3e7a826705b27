//! One contract, two stores: the same checks run against redb and against a real PostgreSQL
//! server (started by the test), each through two handles of one store, as two hosts sharing
//! it would use it.

use super::{CommitError, PostgresStore, RedbStore, StateStore, Txn};
use std::sync::Arc;

/// One handle on a store, as a host holds it.
type Store = Arc<dyn StateStore>;
use crate::postgres_server::Postgres;
use crate::types::Message;

fn message(key: &str) -> Message {
    Message {
        topic: "t".into(),
        key: Some(key.into()),
        payload: key.as_bytes().to_vec(),
        headers: vec![],
    }
}

fn txn() -> Txn {
    Txn::new("svc".into())
}

/// Two transactions read a key as absent and both write it: the second commit conflicts.
async fn racing_writes_of_one_key_conflict(a: &Store, b: &Store) {
    let (mut t1, mut t2) = (txn(), txn());
    assert_eq!(t1.get(&**a, "b", "k").await.unwrap(), None);
    assert_eq!(t2.get(&**b, "b", "k").await.unwrap(), None);
    t1.put("b".into(), "k".into(), Some(b"1".to_vec())).unwrap();
    t2.put("b".into(), "k".into(), Some(b"2".to_vec())).unwrap();
    a.commit(t1).await.unwrap();
    assert!(matches!(b.commit(t2).await, Err(CommitError::Conflict)));
    assert_eq!(
        txn().get(&**b, "b", "k").await.unwrap(),
        Some(b"1".to_vec())
    );
}

/// Each of two transactions reads the other's key as absent and inserts its own (write skew):
/// committed at the same time, exactly one lands, every round.
async fn write_skew_on_absent_keys_is_refused(a: &Store, b: &Store) {
    for round in 0..20 {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        let (mut t1, mut t2) = (txn(), txn());
        assert_eq!(t1.get(&**a, "skew", &y).await.unwrap(), None);
        assert_eq!(t2.get(&**b, "skew", &x).await.unwrap(), None);
        t1.put("skew".into(), x.clone(), Some(vec![1])).unwrap();
        t2.put("skew".into(), y.clone(), Some(vec![2])).unwrap();
        let (r1, r2) = tokio::join!(a.commit(t1), b.commit(t2));
        let landed = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
        assert_eq!(landed, 1, "round {round}: {r1:?} {r2:?}");
        for r in [r1, r2] {
            assert!(matches!(r, Ok(()) | Err(CommitError::Conflict)), "{r:?}");
        }
    }
}

/// Commits that each read a key as absent and insert it, with keys side by side in one bucket
/// (as new emails are), committed all at once through both handles: none touches another's
/// keys, so every one lands (SERIALIZABLE's predicate locks, which cover whole index pages,
/// would refuse some).
async fn unrelated_commits_never_conflict(a: &Store, b: &Store) {
    let commits = (0..32).map(|i| {
        let db = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            let mut t = txn();
            let key = format!("email:u{i:03}@ex.com");
            assert_eq!(t.get(&*db, "emails", &key).await.unwrap(), None);
            t.put("emails".into(), key, Some(vec![1])).unwrap();
            t.put("users".into(), format!("{i:020}"), Some(vec![2]))
                .unwrap();
            t.send(message(&format!("u{i}"))).unwrap();
            db.commit(t).await
        }
    });
    let results = futures_util::future::join_all(commits).await;
    let refused: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    let emails = txn().list_keys(&**a, "emails", "email:").await.unwrap();
    assert_eq!(emails.len(), 32);
    let waiting = a.outbox().oldest(100).await.unwrap();
    assert_eq!(waiting.len(), 32);
    let seqs: Vec<u64> = waiting.iter().map(|(s, _)| *s).collect();
    a.outbox().remove(&seqs).await.unwrap();
}

/// A listed range that gains a key conflicts; a page does not conflict with keys beyond it.
async fn listed_ranges_are_validated(a: &Store, b: &Store) {
    let mut seed = txn();
    for k in ["a1", "a3", "a5"] {
        seed.put("l".into(), k.into(), Some(vec![0])).unwrap();
    }
    a.commit(seed).await.unwrap();

    let mut lister = txn();
    assert_eq!(
        lister.list_keys(&**a, "l", "a").await.unwrap(),
        ["a1", "a3", "a5"]
    );
    lister
        .put("l".into(), "count".into(), Some(vec![3]))
        .unwrap();
    let mut insert = txn();
    insert.put("l".into(), "a2".into(), Some(vec![0])).unwrap();
    b.commit(insert).await.unwrap();
    assert!(matches!(a.commit(lister).await, Err(CommitError::Conflict)));

    // The first page (a1, a2) does not cover a4.
    let mut page = txn();
    assert_eq!(
        page.list_page(&**a, "l", "a", None, 2).await.unwrap(),
        ["a1", "a2"]
    );
    page.put("l".into(), "seen".into(), Some(vec![2])).unwrap();
    let mut beyond = txn();
    beyond.put("l".into(), "a4".into(), Some(vec![0])).unwrap();
    b.commit(beyond).await.unwrap();
    a.commit(page).await.unwrap();
    let after = txn()
        .list_page(&**b, "l", "a", Some("a2"), 10)
        .await
        .unwrap();
    assert_eq!(after, ["a3", "a4", "a5"]);

    // Keys beyond ASCII digest alike in the host and in the store: an unchanged range lands.
    let mut wide = txn();
    for k in ["é1", "é\u{10FFFF}"] {
        wide.put("l".into(), k.into(), Some(vec![0])).unwrap();
    }
    a.commit(wide).await.unwrap();
    let mut lister = txn();
    assert_eq!(
        lister.list_keys(&**b, "l", "é").await.unwrap(),
        ["é1", "é\u{10FFFF}"]
    );
    lister
        .put("l".into(), "count".into(), Some(vec![2]))
        .unwrap();
    b.commit(lister).await.unwrap();
}

/// Ids taken through both handles at once never repeat.
async fn ids_never_repeat_across_handles(a: &Store, b: &Store) {
    let take = |db: &Store| {
        let db = db.clone();
        async move {
            let mut ids = Vec::new();
            for _ in 0..50 {
                let mut t = txn();
                ids.push(db.next_id(&mut t, "seq".into(), "id".into()).await.unwrap());
                db.commit(t).await.unwrap();
            }
            ids
        }
    };
    let (x, y) = tokio::join!(take(a), take(b));
    let mut all: Vec<u64> = x.into_iter().chain(y).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 100);
    assert!(all[0] >= 1);
    // An id taken after another was handed out is larger, whichever handle takes it.
    let mut last = all[99];
    for db in [a, b].into_iter().cycle().take(10) {
        let id = db
            .next_id(&mut txn(), "seq".into(), "id".into())
            .await
            .unwrap();
        assert!(id > last, "{id} after {last}");
        last = id;
    }
}

/// Messages land with their commit, and a conflicting commit sends nothing.
async fn outbox_rows_land_with_their_commit_only(a: &Store, b: &Store) {
    let mut reader = txn();
    reader.get(&**a, "o", "k").await.unwrap();
    reader.put("o".into(), "k".into(), Some(vec![1])).unwrap();
    reader.send(message("lost")).unwrap();
    let mut winner = txn();
    winner.put("o".into(), "k".into(), Some(vec![2])).unwrap();
    winner.send(message("sent")).unwrap();
    b.commit(winner).await.unwrap();
    assert!(matches!(a.commit(reader).await, Err(CommitError::Conflict)));
    let waiting = a.outbox().oldest(100).await.unwrap();
    let keys: Vec<_> = waiting
        .iter()
        .map(|(_, m)| m.key.clone().unwrap())
        .collect();
    assert_eq!(keys, ["sent"]);
    let seqs: Vec<u64> = waiting.iter().map(|(s, _)| *s).collect();
    a.outbox().remove(&seqs).await.unwrap();
    assert!(a.outbox().oldest(100).await.unwrap().is_empty());
}

/// An invocation that read 20,000 (absent) keys commits, as it does on any store: on
/// PostgreSQL its reads lock the bucket rather than each key (a lock per key would overflow
/// the server's lock table). Its reads are still checked: a write to one of them conflicts.
async fn a_commit_that_read_twenty_thousand_keys_lands(a: &Store, b: &Store) {
    let read_all = |db: Store| async move {
        let mut t = txn();
        for i in 0..60_000 {
            assert_eq!(t.get(&*db, "many", &format!("k{i}")).await.unwrap(), None);
        }
        t.put("other".into(), "done".into(), Some(vec![1])).unwrap();
        t
    };
    let t = read_all(a.clone()).await;
    a.commit(t).await.unwrap();
    let t = read_all(a.clone()).await;
    let mut w = txn();
    w.put("many".into(), "k59999".into(), Some(vec![1]))
        .unwrap();
    b.commit(w).await.unwrap();
    assert!(matches!(a.commit(t).await, Err(CommitError::Conflict)));
}

async fn run_all(a: &Store, b: &Store) {
    racing_writes_of_one_key_conflict(a, b).await;
    write_skew_on_absent_keys_is_refused(a, b).await;
    unrelated_commits_never_conflict(a, b).await;
    listed_ranges_are_validated(a, b).await;
    ids_never_repeat_across_handles(a, b).await;
    outbox_rows_land_with_their_commit_only(a, b).await;
    a_commit_that_read_twenty_thousand_keys_lands(a, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_contract_holds_on_redb() {
    let db: Store = Arc::new(RedbStore::in_memory().unwrap());
    run_all(&db, &db.clone()).await;
}

/// A store on database `url`.
async fn shared(url: &str) -> Store {
    shared_waiting(url, std::time::Duration::from_secs(30)).await
}

/// [`shared`], whose commits wait at most `wait` for a lock.
async fn shared_waiting(url: &str, wait: std::time::Duration) -> Store {
    Arc::new(PostgresStore::connect(url, wait, None, 8).await.unwrap())
}

/// A session that took a key's lock and then never finished (its host died mid-commit, or was
/// cut off): a commit that needs the key fails as unavailable within its wait, instead of
/// waiting for hours; commits on other keys are not held.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_held_by_a_dead_session_fails_a_commit_within_its_wait() {
    let server = Postgres::start().expect("a PostgreSQL server for the tests");
    let url = server.create_database("stuck").unwrap();
    let db = shared_waiting(&url, std::time::Duration::from_secs(1)).await;
    let (stuck, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let (k1, k2) = super::postgres::lock_id("svc", "b", Some("k"));
    stuck.batch_execute("BEGIN").await.unwrap();
    stuck
        .execute("SELECT pg_advisory_xact_lock($1, $2)", &[&k1, &k2])
        .await
        .unwrap();
    // Commits that need the key wait for it; the rest of the host's commits do not.
    let began = std::time::Instant::now();
    let held: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            let mut t = txn();
            t.put("b".into(), "k".into(), Some(vec![1])).unwrap();
            tokio::spawn(async move { db.commit(t).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut other = txn();
    other
        .put("b".into(), "elsewhere".into(), Some(vec![1]))
        .unwrap();
    db.commit(other).await.unwrap();
    assert!(
        began.elapsed() < std::time::Duration::from_millis(700),
        "a commit on another key waited behind those on the held key"
    );
    for commit in held {
        let result = tokio::time::timeout(std::time::Duration::from_secs(20), commit)
            .await
            .expect("the commit waited past its wait")
            .unwrap();
        assert!(matches!(result, Err(CommitError::Storage(_))), "{result:?}");
    }
    assert!(began.elapsed() >= std::time::Duration::from_millis(900));
    // The pool is not left holding a broken transaction: the next commits go through.
    for i in 0..40 {
        let mut t = txn();
        t.put("b".into(), format!("after{i}"), Some(vec![1]))
            .unwrap();
        db.commit(t).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_contract_holds_on_postgresql_and_survives_a_server_restart() {
    let mut server = Postgres::start().expect("a PostgreSQL server for the tests");
    let url = server.create_database("contract").unwrap();
    let (a, b) = (shared(&url).await, shared(&url).await);
    run_all(&a, &b).await;

    // What was committed is there for a new connection, and after the server restarts the
    // same handle reconnects by itself.
    let mut t = txn();
    t.put("d".into(), "k".into(), Some(b"kept".to_vec()))
        .unwrap();
    t.send(message("after")).unwrap();
    a.commit(t).await.unwrap();
    drop((a, b));
    let c = shared(&url).await;
    assert_eq!(
        txn().get(&*c, "d", "k").await.unwrap(),
        Some(b"kept".to_vec())
    );
    server.stop().unwrap();
    assert!(
        txn().get(&*c, "d", "k").await.is_err(),
        "no server, no answer"
    );
    server.resume().unwrap();
    assert_eq!(
        txn().get(&*c, "d", "k").await.unwrap(),
        Some(b"kept".to_vec())
    );
    let waiting = c.outbox().oldest(10).await.unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
}

/// What was acknowledged survives a crash of the server: a commit at once, a handler's applied
/// writes once `durable` returned; and an id a durable commit holds is never handed out again,
/// though ids are taken without waiting for the disk. The server writes its WAL only at commits
/// that wait for it (`wal_writer_delay` 10 s), so what nothing waited for is lost in the crash.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_commits_and_their_ids_survive_a_server_crash() {
    let mut server = Postgres::start_with(&["synchronous_commit=on", "wal_writer_delay=10s"])
        .expect("a PostgreSQL server for the tests");
    let url = server.create_database("crash").unwrap();
    let db = shared(&url).await;
    let mut t = txn();
    let id = db.next_id(&mut t, "ids".into(), "n".into()).await.unwrap();
    t.put(
        "d".into(),
        "committed".into(),
        Some(id.to_string().into_bytes()),
    )
    .unwrap();
    db.commit(t).await.unwrap();
    let mut t = txn();
    t.put("d".into(), "applied".into(), Some(b"flushed".to_vec()))
        .unwrap();
    db.apply(t).await.unwrap();
    db.durable().await.unwrap();
    let mut t = txn();
    let unflushed = db.next_id(&mut t, "ids".into(), "n".into()).await.unwrap();
    assert_eq!(unflushed, id + 1);
    server.crash().unwrap();
    server.resume().unwrap();
    let db = shared(&url).await;
    let read = |key: &'static str| {
        let db = db.clone();
        async move { txn().get(&*db, "d", key).await.unwrap() }
    };
    assert_eq!(read("committed").await, Some(id.to_string().into_bytes()));
    assert_eq!(read("applied").await, Some(b"flushed".to_vec()));
    let mut t = txn();
    let after = db.next_id(&mut t, "ids".into(), "n".into()).await.unwrap();
    assert!(after > id, "id {id} handed out again after the crash");
}

/// A relay whose session ended (its connection cut mid-drain; its partition locks went with
/// it) deletes nothing it read: another host takes the partitions and publishes those rows.
/// Live relays then share the partitions, each holding its half.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_that_lost_its_session_deletes_nothing_and_relays_share_partitions() {
    let server = Postgres::start().expect("a PostgreSQL server for the tests");
    let url = server.create_database("relay").unwrap();
    let (a, b) = (shared(&url).await, shared(&url).await);
    let mut t = txn();
    for key in 0..64 {
        t.send(message(&key.to_string())).unwrap();
    }
    a.commit(t).await.unwrap();
    let read = a.outbox().oldest(100).await.unwrap();
    assert_eq!(read.len(), 64, "the only relay holds every partition");
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let ended = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'microsvc-outbox-relay' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ended, 1);
    let seqs: Vec<u64> = read.iter().map(|(s, _)| *s).collect();
    assert!(
        a.outbox().remove(&seqs).await.is_err(),
        "removed on a session that ended"
    );
    let taken = b.outbox().oldest(100).await.unwrap();
    assert_eq!(taken.len(), 64, "B drains what A read but could not remove");
    // A is back: within a few claims each relay holds about half of the partitions, and
    // between them all of them, each partition once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (on_a, on_b) = (
            a.outbox().oldest(100).await.unwrap(),
            b.outbox().oldest(100).await.unwrap(),
        );
        let seqs_a: std::collections::BTreeSet<u64> = on_a.iter().map(|(s, _)| *s).collect();
        let seqs_b: std::collections::BTreeSet<u64> = on_b.iter().map(|(s, _)| *s).collect();
        if !seqs_a.is_empty() && !seqs_b.is_empty() && seqs_a.len() + seqs_b.len() == 64 {
            assert!(seqs_a.is_disjoint(&seqs_b));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never shared: A {} rows, B {}",
            seqs_a.len(),
            seqs_b.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
