//! Admission of a service's requests: a permit per request in flight, then a short bounded
//! queue, and a refusal (503 with Retry-After) only past it, reported as a rate.

use crate::metrics;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, SemaphorePermit};

/// How long and how many requests may wait for a permit (`--queue-wait`, `--queue-length`).
#[derive(Clone, Copy, Debug)]
pub struct QueueSettings {
    /// Clients waiting at once per service; one more is refused at once.
    pub length: usize,
    /// Longest a request waits for a permit before it is refused.
    pub wait: Duration,
}

/// Who asks to be admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A client on the service's port.
    Client,
    /// An invocation of another service, through an in-process call. Its caller holds a
    /// permit while it waits, so it must not wait behind queued clients (in a cycle they
    /// would wait for each other): when every permit is taken it may use as many again,
    /// waiting only for those. It takes no place in the queue (callers' own permits bound
    /// them).
    Service,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue was full when it arrived.
    QueueFull,
    /// It waited `--queue-wait` and no permit came free.
    WaitedOut,
    /// It was admitted but no instance slot was free (`--max-instances`).
    NoSlot,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::WaitedOut => "waited_out",
            Refusal::NoSlot => "no_slot",
        }
    }

    /// The 503's message.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::QueueFull => "is at its concurrency limit and its queue is full; retry",
            Refusal::WaitedOut => {
                "is at its concurrency limit and no request finished in time; retry"
            }
            Refusal::NoSlot => "has no free instance slot (all are busy); retry",
        }
    }
}

/// Refusals are logged at most once per this interval and service, with their count.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// One service's permits and queue.
pub struct Admission {
    service: Arc<str>,
    /// Handed out in arrival order: a freed permit goes to the longest waiting client, never
    /// to a newcomer.
    permits: Semaphore,
    /// What in-process calls use when every permit is taken.
    calls: Semaphore,
    limit: usize,
    queued: AtomicUsize,
    queue: QueueSettings,
    queued_gauge: Gauge,
    wait: metrics::Latency,
    report: Mutex<Report>,
}

#[derive(Default)]
struct Report {
    last: Option<Instant>,
    refused: u64,
}

impl Admission {
    pub fn new(service: &Arc<str>, limit: usize, queue: QueueSettings) -> Admission {
        let labels = metrics::labels([("service", service)]);
        Admission {
            service: service.clone(),
            permits: Semaphore::new(limit),
            calls: Semaphore::new(limit),
            limit,
            queued: AtomicUsize::new(0),
            queue,
            queued_gauge: metrics::get().queued.get_or_create(&labels).clone(),
            wait: metrics::get().queue_wait.get_or_create(&labels).clone(),
            report: Mutex::default(),
        }
    }

    pub fn queue(&self) -> QueueSettings {
        self.queue
    }

    /// Requests and calls admitted and not finished.
    pub fn in_flight(&self) -> usize {
        2 * self.limit - self.permits.available_permits() - self.calls.available_permits()
    }

    /// A permit, held while the request runs: at once if one is free, else after waiting in
    /// the queue up to `--queue-wait`.
    pub async fn admit(&self, caller: Caller) -> Result<SemaphorePermit<'_>, Refusal> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(permit);
        }
        let began = Instant::now();
        let waited = match caller {
            Caller::Service => tokio::time::timeout(self.queue.wait, self.calls.acquire()).await,
            Caller::Client => {
                let Some(_place) = self.enqueue() else {
                    self.refused(Refusal::QueueFull);
                    return Err(Refusal::QueueFull);
                };
                tokio::time::timeout(self.queue.wait, self.permits.acquire()).await
            }
        };
        self.wait.observe(began.elapsed().as_secs_f64());
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; past the wait, the request is refused.
            Ok(Err(_)) | Err(_) => {
                self.refused(Refusal::WaitedOut);
                Err(Refusal::WaitedOut)
            }
        }
    }

    /// A place in the queue, if it is not full.
    fn enqueue(&self) -> Option<Place<'_>> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.queue.length).then_some(n + 1)
            })
            .ok()?;
        self.queued_gauge.inc();
        Some(Place(self))
    }

    /// Counts a refusal, and logs the refusals since the last report if the interval passed.
    pub fn refused(&self, why: Refusal) {
        metrics::get()
            .shed
            .get_or_create(&metrics::labels([
                ("service", &self.service),
                ("reason", why.label()),
            ]))
            .inc();
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        report.refused += 1;
        if report
            .last
            .is_none_or(|last| last.elapsed() >= REPORT_EVERY)
        {
            tracing::warn!(
                service = %self.service,
                refused = report.refused,
                last = why.label(),
                "overloaded: requests refused with 503 since the last report (one report per {}s at most; host_requests_shed_total counts them all)",
                REPORT_EVERY.as_secs()
            );
            *report = Report {
                last: Some(Instant::now()),
                refused: 0,
            };
        }
    }
}

/// A client's place in the queue, given back when it is admitted or refused.
struct Place<'a>(&'a Admission);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
        self.0.queued_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limit: usize, length: usize, wait_ms: u64) -> Arc<Admission> {
        let queue = QueueSettings {
            length,
            wait: Duration::from_millis(wait_ms),
        };
        Arc::new(Admission::new(&Arc::from("test"), limit, queue))
    }

    #[tokio::test]
    async fn a_client_waits_for_a_permit_and_gets_it_when_one_is_freed() {
        let admission = admission(1, 4, 5_000);
        let held = admission.admit(Caller::Client).await.unwrap();
        let waiting = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(Caller::Client).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(admission.queued.load(Ordering::Acquire), 1);
        drop(held);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(admission.queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn past_the_queue_length_or_the_wait_a_client_is_refused() {
        let admission = admission(1, 1, 200);
        let _held = admission.admit(Caller::Client).await.unwrap();
        let waiting = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(Caller::Client).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let full = admission.admit(Caller::Client).await.map(drop);
        assert_eq!(full, Err(Refusal::QueueFull));
        let began = Instant::now();
        assert_eq!(waiting.await.unwrap(), Err(Refusal::WaitedOut));
        assert!(began.elapsed() < Duration::from_millis(1_000));
    }

    #[tokio::test]
    async fn an_in_process_call_does_not_wait_behind_queued_clients() {
        let admission = admission(1, 8, 5_000);
        let held = admission.admit(Caller::Client).await.unwrap();
        let queued = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(Caller::Client).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Every permit is taken and a client waits: a call is admitted at once beside them.
        let call =
            tokio::time::timeout(Duration::from_millis(100), admission.admit(Caller::Service))
                .await
                .expect("the call waited behind the client")
                .unwrap();
        assert_eq!(admission.in_flight(), 2);
        // As many calls again, then they wait for one of those.
        let second = admission.admit(Caller::Service);
        assert!(tokio::time::timeout(Duration::from_millis(100), second)
            .await
            .is_err());
        drop(call);
        // The client gets the permit freed by the first request, not a newcomer.
        drop(held);
        assert_eq!(queued.await.unwrap(), Ok(()));
        assert_eq!(admission.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_freed_permit_goes_to_the_longest_waiting_client() {
        let admission = admission(1, 8, 5_000);
        let held = admission.admit(Caller::Client).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..4 {
            let (admission, tx) = (admission.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let permit = admission.admit(Caller::Client).await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(permit);
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(held);
        // A newcomer arriving as the permit is freed does not take it.
        assert!(admission.permits.try_acquire().is_err());
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order, [0, 1, 2, 3]);
    }
}
