//! Host-wide settings of invocations, read once from the flags.

use super::admission::QueueSettings;
use super::cache::CompileCache;
use crate::config::Args;
use crate::messaging::RetryPolicy;
use std::time::Duration;

/// Host-wide settings of invocations, from the flags.
pub struct Settings {
    pub outbound_timeout: Duration,
    pub header_timeout: Duration,
    /// Longest one response write may wait for the client to read.
    pub write_timeout: Duration,
    pub body_timeout: Duration,
    /// Open connections per service port.
    pub max_connections: usize,
    /// Wall-clock limit of one invocation (a request or a message).
    pub request_timeout: Duration,
    /// Bytes of waiting events beyond which sending invocations are refused (`OUTBOX_MAX`).
    pub outbox_max: u64,
    /// Host bytes one invocation may make the host hold (`INVOCATION_HOST_BYTES`).
    pub invocation_host_bytes: usize,
    pub compile_cache: CompileCache,
    pub retry: RetryPolicy,
    /// Requests per instance (1 = a fresh instance per request).
    pub instance_reuse: u32,
    /// Idle instances kept per service when instances are reused.
    pub idle_max: usize,
    /// Each service's admission queue.
    pub queue: QueueSettings,
}

impl Settings {
    pub fn new(args: &Args, services: usize) -> Settings {
        Settings {
            outbound_timeout: args.outbound_timeout,
            header_timeout: args.header_timeout,
            write_timeout: args.write_timeout,
            body_timeout: args.body_timeout,
            max_connections: args.max_connections.max(1),
            request_timeout: args.request_timeout,
            outbox_max: args.outbox_max,
            invocation_host_bytes: usize::try_from(args.invocation_host_bytes)
                .unwrap_or(usize::MAX),
            compile_cache: CompileCache {
                dir: args.compile_cache.clone(),
                max_bytes: args.compile_cache_max,
            },
            retry: RetryPolicy {
                max_attempts: args.retry_max_attempts.max(1),
                base: args.retry_backoff,
                max: args.retry_backoff_max,
            },
            instance_reuse: args.instance_reuse,
            // Idle instances hold pool slots: leave at least half the slots for fresh ones.
            idle_max: (args.max_instances as usize / (2 * services.max(1))).min(64),
            queue: QueueSettings {
                length: args.queue_length,
                wait: args.queue_wait,
            },
        }
    }
}
