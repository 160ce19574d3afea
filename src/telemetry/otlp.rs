//! OTLP exporters for traces, metrics and logs (gRPC or HTTP/protobuf), built from the `otel`
//! config. The SDK's batch processors export from their own OS threads; the OTLP transports
//! need a tokio reactor, so each exporter is wrapped to run its export on a small dedicated
//! runtime. An unreachable or slow collector therefore only ever occupies that runtime: export
//! queues are bounded by the SDK (data beyond them is dropped), and failures are logged at most
//! once per [`WARN_EVERY`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tokio::runtime::Handle;

use crate::config::{OtelConfig, Signal};

/// Failed exports are logged at most this often (with the count since the last warning).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Failed export batches of each signal (`traces`, `metrics`, `logs`, the order of
/// [`crate::telemetry::metrics::EXPORT_SIGNALS`]), read by `telemetry_export_failures_total`.
#[derive(Debug, Default)]
pub struct ExportFailures(pub [AtomicU64; 3]);

impl ExportFailures {
    fn slot(&self, signal: &str) -> &AtomicU64 {
        let i = crate::telemetry::metrics::EXPORT_SIGNALS.iter().position(|s| *s == signal).unwrap_or(0);
        &self.0[i]
    }
}

/// Counts failed exports of one signal and rate-limits the warning about them.
struct Failures {
    signal: &'static str,
    counts: Arc<ExportFailures>,
    last_warn: Mutex<Option<Instant>>,
}

impl Failures {
    fn new(signal: &'static str, counts: Arc<ExportFailures>) -> Self {
        Self { signal, counts, last_warn: Mutex::new(None) }
    }

    fn record(&self, result: &OTelSdkResult) {
        let Err(err) = result else { return };
        let total = self.counts.slot(self.signal).fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            // The target is excluded from OTLP log export, so this cannot loop.
            tracing::warn!(target: "sockudo::telemetry::export", signal = self.signal, failed_exports = total, error = %err, "OTLP export failed; data of failed batches is dropped");
        }
    }
}

/// An exporter whose exports run on the export runtime.
pub struct OnRuntime<E> {
    inner: E,
    rt: Handle,
    failures: Failures,
}

impl<E> fmt::Debug for OnRuntime<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnRuntime").field("signal", &self.failures.signal).finish()
    }
}

impl<E> OnRuntime<E> {
    fn new(inner: E, rt: Handle, signal: &'static str, counts: Arc<ExportFailures>) -> Self {
        Self { inner, rt, failures: Failures::new(signal, counts) }
    }

    /// Runs an export future to completion on the export runtime. Called on the SDK's own
    /// export thread, which is outside any runtime, so blocking it is what it is for.
    fn run<F: std::future::Future<Output = OTelSdkResult>>(&self, fut: F) -> OTelSdkResult {
        let result = if Handle::try_current().is_ok() {
            // Inside a runtime (never on the SDK's threads): do not block a worker.
            Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure("export called from an async context".into()))
        } else {
            self.rt.block_on(fut)
        };
        self.failures.record(&result);
        result
    }
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.run(self.inner.export(batch))
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

impl<E: LogExporter> LogExporter for OnRuntime<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        self.run(self.inner.export(batch))
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

impl<E: PushMetricExporter> PushMetricExporter for OnRuntime<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        self.run(self.inner.export(metrics))
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

fn headers(c: &OtelConfig) -> HashMap<String, String> {
    OtelConfig::pairs(&c.headers).into_iter().collect()
}

fn metadata(c: &OtelConfig) -> tonic::metadata::MetadataMap {
    let mut map = tonic::metadata::MetadataMap::new();
    for (k, v) in OtelConfig::pairs(&c.headers) {
        if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
            map.insert(k, v);
        }
    }
    map
}

macro_rules! build_exporter {
    ($builder:expr, $c:expr, $endpoint:expr) => {{
        let timeout = Duration::from_millis($c.export_timeout_ms);
        if $c.is_grpc() {
            $builder.with_tonic().with_endpoint($endpoint).with_timeout(timeout).with_metadata(metadata($c)).build()
        } else {
            let protocol = if $c.is_json() { Protocol::HttpJson } else { Protocol::HttpBinary };
            $builder
                .with_http()
                .with_protocol(protocol)
                .with_endpoint($endpoint)
                .with_timeout(timeout)
                .with_headers(headers($c))
                .build()
        }
    }};
}

/// The span exporter, when traces are exported.
pub fn span_exporter(
    c: &OtelConfig,
    rt: &Handle,
    counts: &Arc<ExportFailures>,
) -> anyhow::Result<Option<OnRuntime<opentelemetry_otlp::SpanExporter>>> {
    let Some(endpoint) = c.endpoint_for(Signal::Traces) else { return Ok(None) };
    let _guard = rt.enter();
    let exporter = build_exporter!(opentelemetry_otlp::SpanExporter::builder(), c, endpoint)?;
    Ok(Some(OnRuntime::new(exporter, rt.clone(), "traces", counts.clone())))
}

/// The metric exporter, when metrics are pushed.
pub fn metric_exporter(
    c: &OtelConfig,
    rt: &Handle,
    counts: &Arc<ExportFailures>,
) -> anyhow::Result<Option<OnRuntime<opentelemetry_otlp::MetricExporter>>> {
    let Some(endpoint) = c.endpoint_for(Signal::Metrics) else { return Ok(None) };
    let _guard = rt.enter();
    let exporter = build_exporter!(opentelemetry_otlp::MetricExporter::builder(), c, endpoint)?;
    Ok(Some(OnRuntime::new(exporter, rt.clone(), "metrics", counts.clone())))
}

/// The log exporter, when logs are exported.
pub fn log_exporter(
    c: &OtelConfig,
    rt: &Handle,
    counts: &Arc<ExportFailures>,
) -> anyhow::Result<Option<OnRuntime<opentelemetry_otlp::LogExporter>>> {
    let Some(endpoint) = c.endpoint_for(Signal::Logs) else { return Ok(None) };
    let _guard = rt.enter();
    let exporter = build_exporter!(opentelemetry_otlp::LogExporter::builder(), c, endpoint)?;
    Ok(Some(OnRuntime::new(exporter, rt.clone(), "logs", counts.clone())))
}
