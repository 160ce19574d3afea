//! Delivery of one batch: POST it under its app's permit and a worker permit
//! ([`super::permits`]), and retry 5xx answers, timeouts and connection errors with exponential
//! backoff and jitter for up to `webhooks.max_retry_seconds` (counting each retry). Any other
//! answer is final: 2xx is `delivered`, the rest `failed`. A batch waiting for its next attempt
//! holds no permit, and a dead receiver holds at most `max_in_flight_per_app` workers, for one
//! request timeout per attempt. The batch's places in the queue bounds ([`Held`]) are given
//! back when the job is dropped, however the task ends.
//!
//! Every attempt is a `webhook.send` client span, child of the trace the first event of the
//! batch happened in, and the request carries that span's `traceparent`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use super::{Held, Phase, Shared, Target};
use crate::shutdown::TaskToken;
use crate::telemetry::trace::{continue_from, current_traceparent};
use crate::telemetry::WebhookOutcome;

/// The delay before the first retry; it doubles up to [`MAX_BACKOFF`], each delay drawn from
/// its upper half so that receivers coming back are not hit by every sender at once.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Response body bytes read (so the connection can be reused) before it is dropped.
const MAX_RESPONSE_READ: usize = 64 * 1024;

/// A signed batch for one target.
pub(crate) struct Job {
    /// `X-Sockudo-Webhook-Id`: the same on every attempt, and on a broker queue on every
    /// node that delivers this request, so that receivers can drop what they already have.
    pub id: Arc<str>,
    /// On a broker queue: shutdown leaves an unfinished job to another node (or to this one
    /// after a restart) instead of giving it up.
    pub durable: bool,
    pub target: Arc<Target>,
    pub body: Bytes,
    pub signature: String,
    pub traceparent: Option<Arc<str>>,
    /// The W3C `baggage` of that event's context, sent as the `baggage` header.
    pub baggage: Option<Arc<str>>,
    /// The events' places under the queue bounds, and their app.
    pub held: Held,
}

/// How one attempt went.
enum Attempt {
    Delivered,
    /// 1xx, 3xx or 4xx: the receiver will not accept this batch.
    Refused(u16),
    /// 5xx, a timeout or a connection error.
    Retry(String),
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// Delivered or failed, and counted so.
    Done(WebhookOutcome),
    /// A durable job left unfinished by shutdown: not counted, not acknowledged.
    Left,
}

/// Delivers `job` until it is accepted, refused, out of retry time or shutdown gives up (a
/// durable job is left to another node instead), and counts the outcome.
pub(crate) async fn deliver(shared: Arc<Shared>, job: Job, _token: TaskToken) -> Finished {
    let outcome = attempts(&shared, &job).await;
    if let Finished::Done(outcome) = outcome {
        shared.metrics.webhook(&job.held.app.attrs, outcome);
    }
    outcome
    // Dropping `job` gives its places back.
}

async fn attempts(shared: &Shared, job: &Job) -> Finished {
    let started = Instant::now();
    let mut phase = shared.phase.clone();
    let mut backoff = FIRST_BACKOFF;
    let mut attempt: u32 = 1;
    let left = if job.durable { Finished::Left } else { Finished::Done(WebhookOutcome::Failed) };
    loop {
        let draining = *phase.borrow() != Phase::Running;
        let result = tokio::select! {
            r = send(shared, job, attempt) => r,
            _ = phase.wait_for(|p| *p == Phase::Abort) => return left,
        };
        let why = match result {
            Attempt::Delivered => return Finished::Done(WebhookOutcome::Delivered),
            Attempt::Refused(status) => {
                tracing::warn!(app_id = %job.held.app.id, url = %job.target.shown, status, attempt, "webhook refused by the receiver; not retried");
                return Finished::Done(WebhookOutcome::Failed);
            }
            Attempt::Retry(why) => why,
        };
        let delay = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        // While shutting down a batch gets one more attempt, made at once; a durable one then
        // stays in the broker's queue for the next node.
        if draining && job.durable {
            return Finished::Left;
        }
        if draining || started.elapsed() + delay > shared.max_retry {
            tracing::warn!(app_id = %job.held.app.id, url = %job.target.shown, error = %why, attempt, "webhook delivery failed; giving up");
            return Finished::Done(WebhookOutcome::Failed);
        }
        tracing::debug!(app_id = %job.held.app.id, url = %job.target.shown, error = %why, attempt, delay_ms = delay.as_millis() as u64, "webhook delivery failed; will retry");
        shared.metrics.webhook(&job.held.app.attrs, WebhookOutcome::Retried);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = phase.wait_for(|p| *p != Phase::Running) => {}
        }
        attempt += 1;
    }
}

/// One POST under the app's and a worker's permit, as a `webhook.send` span.
async fn send(shared: &Shared, job: &Job, attempt: u32) -> Attempt {
    let _permits = super::permits(&shared.workers, &job.held.share.in_flight).await;
    let span = tracing::info_span!(
        "webhook.send",
        otel.kind = "client",
        otel.status_code = Empty,
        sockudo.app_id = %job.held.app.id,
        url.full = %job.target.shown,
        server.address = job.target.url.host_str().unwrap_or(""),
        server.port = job.target.url.port_or_known_default().unwrap_or(0),
        http.request.method = "POST",
        http.response.status_code = Empty,
        sockudo.webhook.attempt = attempt,
        sockudo.webhook.id = &*job.id,
    );
    continue_from(&span, job.traceparent.as_deref(), job.baggage.as_deref());
    let traceparent = span.in_scope(current_traceparent).or_else(|| job.traceparent.as_deref().map(str::to_owned));
    let mut request = shared
        .client
        .post(job.target.url.clone())
        .headers(job.target.headers.clone())
        .header(CONTENT_TYPE, "application/json")
        .header("X-Pusher-Key", job.held.app.key.as_str())
        .header("X-Pusher-Signature", job.signature.as_str())
        .header("X-Sockudo-Webhook-Id", &*job.id)
        .body(job.body.clone());
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    if let Some(baggage) = &job.baggage {
        request = request.header("baggage", &**baggage);
    }
    async {
        match request.send().await {
            Ok(mut response) => {
                let status = response.status();
                span.record("http.response.status_code", status.as_u16());
                // Read a little of the answer so the connection goes back to the pool.
                let mut read = 0;
                while let Ok(Some(chunk)) = response.chunk().await {
                    read += chunk.len();
                    if read > MAX_RESPONSE_READ {
                        break;
                    }
                }
                if status.is_success() {
                    Attempt::Delivered
                } else {
                    span.record("otel.status_code", "ERROR");
                    if status.is_server_error() {
                        Attempt::Retry(format!("HTTP {}", status.as_u16()))
                    } else {
                        Attempt::Refused(status.as_u16())
                    }
                }
            }
            Err(err) => {
                span.record("otel.status_code", "ERROR");
                Attempt::Retry(describe(&err))
            }
        }
    }
    .instrument(span.clone())
    .await
}

/// A request error without its URL (which may carry a credential), with its root cause.
fn describe(err: &reqwest::Error) -> String {
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut cause = None;
    let mut next = std::error::Error::source(err);
    while let Some(e) = next {
        cause = Some(e);
        next = e.source();
    }
    match cause {
        Some(c) => format!("{what}: {c}"),
        None => what.to_owned(),
    }
}
