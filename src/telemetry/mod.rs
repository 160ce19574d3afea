//! Telemetry: the OTel meter provider with its Prometheus bridge, every instrument the server
//! records (declared once, in [`metrics`]), and log output. Nothing outside this module creates
//! an instrument or touches an exporter; call sites use the typed methods of [`Metrics`].

pub mod logs;
pub mod metrics;

pub use metrics::{AppAttrs, Limiter, Metrics};

use std::sync::Arc;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::config::Config;

/// The providers and the registry `/metrics` renders.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    registry: Option<prometheus::Registry>,
    provider: SdkMeterProvider,
}

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Telemetry {
    /// Builds the meter provider. With metrics disabled the provider has no reader, so
    /// recording costs next to nothing and no port is bound.
    pub fn new(config: &Config, port: u16) -> anyhow::Result<Self> {
        let mut builder = SdkMeterProvider::builder();
        let registry = if config.metrics.enabled {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .with_namespace(config.metrics.prometheus.prefix.clone())
                .without_units()
                .without_counter_suffixes()
                .without_target_info()
                .scope_info_enabled(false)
                .build()?;
            builder = builder.with_reader(exporter);
            #[cfg(target_os = "linux")]
            registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
            Some(registry)
        } else {
            None
        };
        let provider = builder.build();
        let meter = provider.meter("sockudo");
        let metrics = Arc::new(Metrics::new(&meter, port));
        Ok(Self { metrics, registry, provider })
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

    /// Flushes and stops the providers.
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::debug!(error = %err, "meter provider shutdown");
        }
    }
}
