//! Why an invocation did not answer, and the HTTP response that tells the client.

use super::admission::Refusal;
use super::service::Service;
use crate::types::http::busy;
use crate::types::{json_error, HttpResponse, Overrun};
use hyper::StatusCode;
use platform_contract::SERVICE_SUFFIX;
use std::time::Duration;

/// Why an invocation has nothing to commit, other than what the guest itself answered.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// It ran past the wall-clock limit (`REQUEST_TIMEOUT`): a guest can wait on a clock or a
    /// call without computing, which the CPU deadline does not see.
    #[error("did not finish within {0:?}")]
    WallClock(Duration),
    /// It computed past its CPU deadline.
    #[error("computed past its deadline")]
    Deadline,
    /// No instance slot was free.
    #[error("all instance slots are busy")]
    NoSlot,
    /// It made the host hold more than `INVOCATION_HOST_BYTES`.
    #[error("{0}")]
    Overrun(Overrun),
    /// It trapped, could not be instantiated, or answered what the host cannot use.
    #[error("{0:#}")]
    Guest(anyhow::Error),
}

impl Failure {
    pub(super) fn of(e: anyhow::Error) -> Failure {
        if e.chain()
            .any(|c| c.is::<wasmtime::PoolConcurrencyLimitError>())
        {
            Failure::NoSlot
        } else if e
            .chain()
            .any(|c| c.downcast_ref() == Some(&wasmtime::Trap::Interrupt))
        {
            Failure::Deadline
        } else {
            Failure::Guest(e)
        }
    }
}

/// The 503 of a request refused for want of a permit or an instance slot (counted and
/// reported by the service's admission).
pub(super) fn refused(service: &Service, why: Refusal) -> HttpResponse {
    busy(&format!(
        "{}{SERVICE_SUFFIX} {}",
        service.name,
        why.explain()
    ))
}

/// The response to a request whose invocation failed; its writes were rolled back.
pub(super) fn failed(service: &Service, request_id: &str, failure: Failure) -> HttpResponse {
    let name = &service.name;
    let (status, message) = match &failure {
        Failure::NoSlot => {
            service.admission.refused(Refusal::NoSlot);
            return refused(service, Refusal::NoSlot);
        }
        Failure::WallClock(_) => {
            tracing::error!(service = %name, request_id, error = %failure, "component stopped; its writes were rolled back");
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!("{name}{SERVICE_SUFFIX} {failure}"),
            )
        }
        Failure::Deadline => {
            tracing::error!(service = %name, request_id, deadline = ?service.spec.limits.cpu, "component computed past its CPU deadline; stopped");
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!("{name}{SERVICE_SUFFIX} {failure}"),
            )
        }
        Failure::Overrun(overrun) => {
            tracing::error!(service = %name, request_id, error = %overrun, "component failed; its writes were rolled back");
            let message = format!("{name}{SERVICE_SUFFIX} failed: {overrun}");
            (StatusCode::INTERNAL_SERVER_ERROR, message)
        }
        Failure::Guest(e) => {
            tracing::error!(service = %name, request_id, error = %format!("{e:#}"), "component failed; its writes were rolled back");
            let message = format!("{name}{SERVICE_SUFFIX} failed: {}", e.root_cause());
            (StatusCode::INTERNAL_SERVER_ERROR, message)
        }
    };
    json_error(status, &message)
}
