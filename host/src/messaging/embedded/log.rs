//! The embedded log's tables, and trimming them to the retention limits.

use crate::storage::RedbStore;
use anyhow::Result;
use redb::{ReadableTable, TableDefinition};
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// (topic, offset) -> postcard-encoded [`Message`].
pub(super) const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");
/// (group, topic) -> next offset to deliver.
pub(super) const OFFSETS: TableDefinition<(&str, &str), u64> = TableDefinition::new("offsets");
/// (topic, offset) -> when the record was appended (ms since the Unix epoch), for retention.
pub(super) const APPENDED_AT: TableDefinition<(&str, u64), u64> =
    TableDefinition::new("log_appended_at");
/// topic -> encoded bytes of its records in the log.
pub(super) const LOG_BYTES: TableDefinition<&str, u64> = TableDefinition::new("log_bytes");
/// topic -> the offset its next record gets. Never goes back, even when retention empties the
/// topic: an offset is never given to two records, so no group skips a new one.
pub(super) const LOG_END: TableDefinition<&str, u64> = TableDefinition::new("log_end");
/// (group, topic) -> when a subscriber of the group last held it (ms since the Unix epoch). A
/// group nobody subscribed for longer than the retention age stops holding records back.
pub(super) const GROUP_SEEN: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("log_group_seen");

/// How long the log keeps records every consumer group has handled.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Records older than this go.
    pub age: Duration,
    /// Past this many bytes in a topic, its oldest records go.
    pub bytes: u64,
}

pub(super) fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Removes, per topic, the oldest records that every consumer group of the topic has
/// committed past, while they are older than the retention age or the topic is over its
/// retention size. A topic no group reads (a dead-letter topic) is trimmed by age and size
/// alone. A group counts while it is `live` (subscribed now) or was seen within the retention
/// age; a group that was not (a removed service, a renamed group) no longer holds records back.
/// Returns how many records went, and the groups that did not count. Blocking.
pub fn trim(
    db: &RedbStore,
    retention: Retention,
    now: SystemTime,
    live: &[(String, String)],
) -> Result<(u64, BTreeSet<(String, String)>)> {
    let cutoff = millis(now).saturating_sub(retention.age.as_millis() as u64);
    let mut removed = 0;
    let mut stale = BTreeSet::new();
    db.write_lazily(|wtx| {
        {
            let mut seen = wtx.open_table(GROUP_SEEN)?;
            for (group, topic) in live {
                seen.insert((group.as_str(), topic.as_str()), millis(now))?;
            }
            // Groups from before groups were seen start counting from now.
            let mut unseen = Vec::new();
            for entry in wtx.open_table(OFFSETS)?.iter()? {
                let (key, _) = entry?;
                let (group, topic) = key.value();
                if seen.get((group, topic))?.is_none() {
                    unseen.push((group.to_string(), topic.to_string()));
                }
            }
            for (group, topic) in unseen {
                seen.insert((group.as_str(), topic.as_str()), millis(now))?;
            }
        }
        let seen = wtx.open_table(GROUP_SEEN)?;
        let topics: Vec<(String, u64)> = {
            let sizes = wtx.open_table(LOG_BYTES)?;
            let mut topics = Vec::new();
            for entry in sizes.iter()? {
                let (topic, bytes) = entry?;
                topics.push((topic.value().to_string(), bytes.value()));
            }
            topics
        };
        let offsets = wtx.open_table(OFFSETS)?;
        let mut log = wtx.open_table(LOG)?;
        let mut times = wtx.open_table(APPENDED_AT)?;
        let mut sizes = wtx.open_table(LOG_BYTES)?;
        for (topic, mut bytes) in topics {
            let mut handled = u64::MAX;
            for entry in offsets.iter()? {
                let (key, next) = entry?;
                let (group, of) = key.value();
                if of != topic {
                    continue;
                }
                let at = seen.get((group, of))?.map_or(0, |t| t.value());
                if at < cutoff {
                    stale.insert((group.to_string(), topic.clone()));
                    continue;
                }
                handled = handled.min(next.value());
            }
            loop {
                let Some(first) = log
                    .range((topic.as_str(), 0)..(topic.as_str(), handled))?
                    .next()
                    .transpose()?
                    .map(|(k, v)| (k.value().1, v.value().len() as u64))
                else {
                    break;
                };
                let (offset, len) = first;
                let at = times
                    .get((topic.as_str(), offset))?
                    .map_or(0, |t| t.value());
                if at >= cutoff && bytes <= retention.bytes {
                    break;
                }
                log.remove((topic.as_str(), offset))?;
                times.remove((topic.as_str(), offset))?;
                bytes = bytes.saturating_sub(len);
                removed += 1;
            }
            sizes.insert(topic.as_str(), bytes)?;
        }
        Ok(())
    })?;
    if removed > 0 {
        crate::metrics::get().log_trimmed.inc_by(removed);
    }
    Ok((removed, stale))
}

/// Bytes of all topics in the log.
pub fn log_bytes(db: &RedbStore) -> Result<u64> {
    let rtx = db.redb().begin_read()?;
    let sizes = match rtx.open_table(LOG_BYTES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut total = 0;
    for entry in sizes.iter()? {
        total += entry?.1.value();
    }
    Ok(total)
}
