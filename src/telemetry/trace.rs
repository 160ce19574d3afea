//! Trace context on the wire: the HTTP server span of every API request (continuing an
//! incoming W3C `traceparent` and `baggage`) and its duration in
//! `http_server_request_duration_seconds`, and `traceparent` / `baggage` strings for carrying a
//! span's context across nodes and onto webhook requests.
//!
//! Baggage travels as the caller sent it (the W3C header, at most 8192 bytes as the propagator
//! parses it). Where a context is continued from the wire, its first [`MAX_BAGGAGE_ATTRIBUTES`]
//! entries are also recorded on that span as `baggage.<key>` attributes, so that a trace backend
//! shows what arrived (a `broadcast.remote` span on another node, a WebSocket connection).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::baggage::{BaggageExt, KeyValueMetadata};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A received `traceparent` and `baggage` (an envelope's, a WebSocket upgrade's).
struct Carried<'a> {
    traceparent: Option<&'a str>,
    baggage: Option<&'a str>,
}

impl Extractor for Carried<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "baggage" => self.baggage,
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "baggage"]
    }
}

/// Takes the one header a propagator writes.
struct Capture(&'static str, Option<String>);

impl Injector for Capture {
    fn set(&mut self, key: &str, value: String) {
        if key == self.0 {
            self.1 = Some(value);
        }
    }
}

/// Baggage entries recorded on a span continued from the wire, at most.
pub const MAX_BAGGAGE_ATTRIBUTES: usize = 16;

/// The context in `carrier`: its remote span (if valid) and its baggage.
fn extract(carrier: &dyn Extractor) -> Context {
    let cx = TraceContextPropagator::new().extract(carrier);
    BaggagePropagator::new().extract_with_context(&cx, carrier)
}

/// Makes `cx` the parent of `span` when it holds a valid span or some baggage, and records the
/// baggage's first entries on the span.
fn adopt(span: &tracing::Span, cx: Context) {
    let has_baggage = !cx.baggage().is_empty();
    if !cx.span().span_context().is_valid() && !has_baggage {
        return;
    }
    if has_baggage {
        for (key, (value, _)) in cx.baggage().iter().take(MAX_BAGGAGE_ATTRIBUTES) {
            span.set_attribute(format!("baggage.{}", key.as_str()), value.to_string());
        }
    }
    let _ = span.set_parent(cx);
}

/// `url.scheme` of a request: `https` on a TLS listener (set by the serve loop).
#[derive(Debug, Clone, Copy)]
pub struct Scheme(pub &'static str);

/// The app a handler resolved the request to, put in the response's extensions so that the
/// request's duration is labelled with it (`unknown` when there is none).
#[derive(Debug, Clone)]
pub struct RequestApp(pub String);

/// Axum middleware: one server span per API request, named by its route template, child of
/// the caller's `traceparent` when there is one, and its duration by app, method, route
/// template and status class. WebSocket upgrades get neither.
pub async fn http_span(
    State(metrics): State<Arc<super::Metrics>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let route = match &matched {
        Some(m) if m.as_str() != "/app/{key}" && !upgrade => m.as_str().to_owned(),
        Some(_) => return next.run(req).await,
        None if upgrade => return next.run(req).await,
        None => "unmatched".to_owned(),
    };
    let method = req.method().as_str().to_owned();
    let scheme = req.extensions().get::<Scheme>().map_or("http", |s| s.0);
    let client = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let version = match req.version() {
        axum::http::Version::HTTP_10 => "1.0",
        axum::http::Version::HTTP_2 => "2",
        _ => "1.1",
    };
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = Empty,
        sockudo.app_id = Empty,
        url.path = req.uri().path(),
        url.scheme = scheme,
        server.port = metrics.port(),
        client.address = client.map(|ip| ip.to_string()).unwrap_or_default(),
        network.protocol.version = version,
    );
    adopt(&span, extract(&Headers(req.headers())));
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let app = response.extensions().get::<RequestApp>().map(|a| a.0.as_str());
    let template = matched.as_ref().map(MatchedPath::as_str);
    metrics.http_request(app, &method, template, status.as_u16(), started.elapsed().as_secs_f64());
    response
}

/// The `traceparent` of the current span, to carry in an adapter envelope or a webhook.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut capture = Capture("traceparent", None);
    TraceContextPropagator::new().inject_context(&cx, &mut capture);
    capture.1
}

/// The W3C `baggage` of the current span's context, if it has any: it travels beside the
/// `traceparent`.
pub fn current_baggage() -> Option<String> {
    let cx = tracing::Span::current().context();
    if cx.baggage().is_empty() {
        return None;
    }
    let mut capture = Capture("baggage", None);
    BaggagePropagator::new().inject_context(&cx, &mut capture);
    capture.1
}

/// A span to link other spans to (a socket's work to its `websocket.connection` span): each
/// stays in its own trace, where children would make a long-lived connection one endless trace.
/// Taken once per connection, so a link costs no context lookup.
/// The linked span's baggage goes with the link: a linked span starts its own trace in a
/// context holding that baggage, so what the connection carried reaches its webhooks.
#[derive(Clone, Debug)]
pub struct Link {
    target: opentelemetry::trace::SpanContext,
    baggage: Option<Context>,
}

impl Link {
    /// `None` when `span` has no valid context (tracing without OpenTelemetry).
    pub fn to(span: &tracing::Span) -> Option<Self> {
        let cx = span.context();
        let target = cx.span().span_context().clone();
        let baggage = (!cx.baggage().is_empty()).then(|| {
            let entries: Vec<KeyValueMetadata> =
                cx.baggage().iter().map(|(k, (v, m))| KeyValueMetadata::new(k.clone(), v.clone(), m.clone())).collect();
            Context::new().with_baggage(entries)
        });
        target.is_valid().then_some(Self { target, baggage })
    }

    pub fn add_to(&self, span: &tracing::Span) {
        span.add_link(self.target.clone());
        if let Some(cx) = &self.baggage {
            let _ = span.set_parent(cx.clone());
        }
    }
}

/// Makes `span` a child of a received `traceparent`, with the received `baggage` (each
/// ignored when absent or malformed).
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>, baggage: Option<&str>) {
    adopt(span, extract(&Carried { traceparent, baggage }));
}
