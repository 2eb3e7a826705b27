//! The advisory locks a commit takes: which keys and buckets, in which mode, in one order.

use crate::storage::txn::Txn;
use sha2::{Digest, Sha256};

/// Lock ids: a key (`Some`), or a whole bucket (`None`). Taken with the two-int form of the
/// advisory lock functions: they never meet the outbox partitions' bigint ones.
pub(in crate::storage) fn lock_id(service: &str, bucket: &str, key: Option<&str>) -> (i32, i32) {
    let mut h = Sha256::new();
    for part in [service, bucket] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    if let Some(key) = key {
        h.update([1]);
        h.update(key.as_bytes());
    }
    let d = h.finalize();
    let int = |i: usize| i32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    (int(0), int(4))
}

/// Keys of one bucket an invocation may read before its commit locks the bucket instead of
/// each key (a lock per key would fill PostgreSQL's shared lock table, `max_locks_per_transaction
/// × max_connections`, failing this commit and others).
const KEY_LOCKS_PER_BUCKET: usize = 64;
/// Key locks of reads one commit may take in all; past it every bucket it read is locked whole.
const KEY_LOCKS: usize = 256;

/// The locks committing `txn` takes, sorted, each once, with whether it is exclusive: a key it
/// writes, exclusive; a key it only read, shared; the bucket of a range it listed, exclusive;
/// the bucket of a key it writes, shared (so that a write into a listed range waits for the
/// lister's commit, and the other way round). Two commits conflict on a lock only when
/// one's writes could change what the other read or wrote. Past [`KEY_LOCKS_PER_BUCKET`]
/// keys read in a bucket (or [`KEY_LOCKS`] in all), the reads of a bucket lock it whole,
/// exclusively, as a listed range does: every write into it then waits for this commit.
pub(super) fn locks(txn: &Txn) -> ((Vec<i32>, Vec<i32>), Vec<bool>) {
    let service = &*txn.service;
    let mut modes: std::collections::BTreeMap<(i32, i32), bool> = Default::default();
    let mut take = |id, exclusive: bool| {
        let mode = modes.entry(id).or_insert(exclusive);
        *mode |= exclusive;
    };
    for (bucket, key) in txn.writes.keys() {
        take(lock_id(service, bucket, Some(key)), true);
        take(lock_id(service, bucket, None), false);
    }
    let mut read_per_bucket: std::collections::BTreeMap<&str, usize> = Default::default();
    for (bucket, _, _) in &txn.reads {
        *read_per_bucket.entry(bucket).or_default() += 1;
    }
    let whole = |bucket: &str| {
        txn.reads.len() > KEY_LOCKS || read_per_bucket[bucket] > KEY_LOCKS_PER_BUCKET
    };
    for (bucket, key, _) in &txn.reads {
        if whole(bucket) {
            take(lock_id(service, bucket, None), true);
        } else {
            take(lock_id(service, bucket, Some(key)), false);
        }
    }
    for (range, _) in &txn.lists {
        take(lock_id(service, &range.bucket, None), true);
    }
    let (ids, exclusive): (Vec<_>, Vec<_>) = modes.into_iter().unzip();
    (ids.into_iter().unzip(), exclusive)
}
