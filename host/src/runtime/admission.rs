//! Admission of a service's requests: a permit per request in flight, then a short bounded
//! queue, and a refusal (503 with Retry-After) only past it, reported as a rate.

use crate::metrics;
use prometheus_client::metrics::{gauge::Gauge, histogram::Histogram};
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
    /// An invocation of another service, through an in-process call. It holds a permit of
    /// its own service while it waits, so it is not made to wait behind queued clients: it
    /// waits for this service's permits directly, behind at most the one client at the head
    /// of the queue. It takes no place in the queue (callers' own permits bound them).
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
    permits: Semaphore,
    limit: usize,
    /// Queued clients take turns here in arrival order; only the one holding it waits on
    /// `permits`, so an in-process call waiting there has at most one client before it.
    turn: Semaphore,
    queued: AtomicUsize,
    queue: QueueSettings,
    queued_gauge: Gauge,
    wait: Histogram,
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
            limit,
            turn: Semaphore::new(1),
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

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// A permit, held while the request runs: at once if one is free, else after waiting in
    /// the queue up to `--queue-wait`.
    pub async fn admit(&self, caller: Caller) -> Result<SemaphorePermit<'_>, Refusal> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(permit);
        }
        let began = Instant::now();
        let waited = match caller {
            Caller::Service => tokio::time::timeout(self.queue.wait, self.permits.acquire()).await,
            Caller::Client => {
                let Some(_place) = self.enqueue() else {
                    self.refused(Refusal::QueueFull);
                    return Err(Refusal::QueueFull);
                };
                tokio::time::timeout(self.queue.wait, async {
                    let _turn = self.turn.acquire().await;
                    self.permits.acquire().await
                })
                .await
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
    async fn an_in_process_call_goes_before_queued_clients_but_the_first() {
        let admission = admission(1, 8, 5_000);
        let held = admission.admit(Caller::Client).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for (i, caller) in [
            Caller::Client,
            Caller::Client,
            Caller::Client,
            Caller::Service,
        ]
        .into_iter()
        .enumerate()
        {
            let (admission, tx) = (admission.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let permit = admission.admit(caller).await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(permit);
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            order,
            [0, 3, 1, 2],
            "the call (3) waits behind the first client only"
        );
    }
}
