//! Telemetry: the OTel meter, tracer and logger providers, the Prometheus bridge, OTLP export,
//! and log output. Every instrument the server records is declared in [`metrics`]; nothing
//! outside this module creates an instrument or touches an exporter.

pub mod logs;
pub mod metrics;
mod otlp;
pub mod trace;

pub use metrics::{AppAttrs, CacheMeter, Limiter, Metrics, WebhookOutcome};

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};

use crate::config::Config;

/// Spans and log records queued for export at most (beyond it they are dropped by the SDK).
const EXPORT_QUEUE: usize = 4096;

/// The providers and the registry `/metrics` renders.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    /// The instruments read at collection time (runtime, export failures); kept with the
    /// provider they were registered on.
    _observers: metrics::Observers,
    registry: Option<prometheus::Registry>,
    meter_provider: SdkMeterProvider,
    tracer_provider: SdkTracerProvider,
    logger_provider: Option<SdkLoggerProvider>,
    /// Runs OTLP exports, so a slow collector never occupies the server's workers.
    export_rt: Option<tokio::runtime::Runtime>,
    flush_deadline: Duration,
    pub node_id: String,
}

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn resource(config: &Config, node_id: &str) -> Resource {
    let o = &config.otel;
    let mut attrs: Vec<KeyValue> = crate::config::OtelConfig::pairs(&o.resource_attributes)
        .into_iter()
        .filter(|(k, _)| k != "service.name")
        .map(|(k, v)| KeyValue::new(k, v))
        .collect();
    if !attrs.iter().any(|kv| kv.key.as_str() == "service.instance.id") {
        attrs.push(KeyValue::new("service.instance.id", node_id.to_owned()));
    }
    attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    Resource::builder_empty().with_service_name(o.service_name.clone()).with_attributes(attrs).build()
}

fn sampler(config: &Config) -> Sampler {
    let o = &config.otel;
    let ratio = o.traces_sampler_arg.parse::<f64>().unwrap_or(1.0);
    match o.traces_sampler.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        _ => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
    }
}

impl Telemetry {
    /// Builds the providers. With metrics disabled the meter provider has no reader (recording
    /// costs next to nothing); with no OTLP endpoint nothing is exported, but spans still carry
    /// trace ids so that logs can be correlated with an incoming `traceparent`.
    pub fn new(config: &Config, port: u16, node_id: &str) -> anyhow::Result<Self> {
        let resource = resource(config, node_id);
        let o = &config.otel;
        let drivers: Vec<&str> = config.metrics.driver.split(',').map(str::trim).collect();
        let wants_otlp = config.otel.endpoint_for(crate::config::Signal::Traces).is_some()
            || config.otel.endpoint_for(crate::config::Signal::Logs).is_some()
            || (config.metrics.enabled && drivers.contains(&"otlp"));
        let export_rt = if wants_otlp {
            Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otel-export")
                    .enable_all()
                    .build()?,
            )
        } else {
            None
        };

        let failures = Arc::new(otlp::ExportFailures::default());
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
        let mut registry = None;
        if config.metrics.enabled && drivers.contains(&"prometheus") {
            let r = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(r.clone())
                .with_namespace(config.metrics.prometheus.prefix.clone())
                .without_units()
                .without_counter_suffixes()
                .without_target_info()
                .scope_info_enabled(false)
                .build()?;
            meters = meters.with_reader(exporter);
            #[cfg(target_os = "linux")]
            r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
            registry = Some(r);
        }
        if let (true, true, Some(rt)) = (config.metrics.enabled, drivers.contains(&"otlp"), &export_rt) {
            if let Some(exporter) = otlp::metric_exporter(o, rt.handle(), &failures)? {
                let reader = PeriodicReader::builder(exporter)
                    .with_interval(Duration::from_millis(o.metric_export_interval_ms))
                    .build();
                meters = meters.with_reader(reader);
            }
        }
        let meter_provider = meters.build();
        let meter = meter_provider.meter("sockudo");
        let metrics = Arc::new(Metrics::new(&meter, port));
        let observers = metrics::Observers::register(&meter, port, failures.clone());

        let mut tracers = SdkTracerProvider::builder().with_resource(resource.clone()).with_sampler(sampler(config));
        if let Some(rt) = &export_rt {
            if let Some(exporter) = otlp::span_exporter(o, rt.handle(), &failures)? {
                let batch = BatchConfigBuilder::default().with_max_queue_size(EXPORT_QUEUE).build();
                tracers =
                    tracers.with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build());
            }
        }
        let tracer_provider = tracers.build();

        let logger_provider = match &export_rt {
            Some(rt) => otlp::log_exporter(o, rt.handle(), &failures)?.map(|exporter| {
                let batch =
                    opentelemetry_sdk::logs::BatchConfigBuilder::default().with_max_queue_size(EXPORT_QUEUE).build();
                let processor =
                    opentelemetry_sdk::logs::BatchLogProcessor::builder(exporter).with_batch_config(batch).build();
                SdkLoggerProvider::builder().with_resource(resource.clone()).with_log_processor(processor).build()
            }),
            None => None,
        };

        Ok(Self {
            metrics,
            _observers: observers,
            registry,
            meter_provider,
            tracer_provider,
            logger_provider,
            export_rt,
            flush_deadline: Duration::from_millis(o.export_timeout_ms),
            node_id: node_id.to_owned(),
        })
    }

    /// Installs the process-wide log subscriber (text or JSON to stdout, spans to the tracer,
    /// events to OTLP logs when on). Only the first call in a process installs anything.
    pub fn install_logging(&self, config: &Config) {
        logs::init(config, self.tracer_provider.tracer("sockudo"), self.logger_provider.as_ref());
    }

    /// Whether `/metrics` has anything to serve.
    pub fn prometheus_enabled(&self) -> bool {
        self.registry.is_some()
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        let Some(registry) = &self.registry else { return String::new() };
        let mut buf = Vec::with_capacity(16 * 1024);
        if let Err(err) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
            tracing::warn!(error = %err, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Flushes what is queued and stops the providers, within the export deadline; never
    /// blocks an async worker.
    pub async fn shutdown(self) {
        let deadline = self.flush_deadline + Duration::from_secs(1);
        let Self { meter_provider, tracer_provider, logger_provider, export_rt, .. } = self;
        let flush = tokio::task::spawn_blocking(move || {
            let timeout = deadline;
            let _ = tracer_provider.shutdown_with_timeout(timeout);
            let _ = meter_provider.shutdown_with_timeout(timeout);
            if let Some(l) = logger_provider {
                let _ = l.shutdown_with_timeout(timeout);
            }
        });
        if tokio::time::timeout(deadline * 2, flush).await.is_err() {
            tracing::warn!("telemetry flush did not finish within its deadline");
        }
        if let Some(rt) = export_rt {
            rt.shutdown_background();
        }
    }
}
