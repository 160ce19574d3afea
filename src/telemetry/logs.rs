//! Log output: text or flat JSON lines on stdout, filtered by `LOG_LEVEL` (or `RUST_LOG` when
//! set, which takes a full filter; a plain level applies to sockudo, while dependencies log at
//! most `info`, since at debug/trace some print whole frames and signed request lines). JSON
//! lines carry `timestamp`, upper-case `level`, top-level
//! `message`, `target`, the event's fields, and `trace_id`/`span_id` of the current span, so a
//! broadcast's log lines can be found by the trace id of its request.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::Tracer;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{Config, LogFormat};

/// Targets whose own diagnostics must not be exported over OTLP (that would loop) nor flood
/// the log: the exporters' internals. Our rate-limited export warnings use
/// `sockudo::telemetry::export`.
const QUIET: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry-otlp",
    "h2",
    "tonic",
    "hyper",
    "hyper_util",
    "tower",
];

fn filter(config: &Config) -> EnvFilter {
    let directives = match std::env::var("RUST_LOG").ok().filter(|f| EnvFilter::try_new(f).is_ok()) {
        // A full filter is the operator's explicit choice, dependencies included.
        Some(full) => full,
        None => {
            // A plain level applies to sockudo; dependencies log at most `info`, because at
            // debug/trace some of them (tungstenite, hyper) print whole frames and request
            // lines, which carry auth strings, signatures and payloads.
            let level = config.effective_log_level();
            let deps = match level {
                "debug" | "trace" => "info",
                other => other,
            };
            let mut d = format!("{deps},sockudo={level}");
            for t in QUIET {
                d.push_str(&format!(",{t}=off"));
            }
            d
        }
    };
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber once; later calls (several servers in one test process)
/// leave the first one in place.
pub fn init(config: &Config, tracer: Tracer, logger: Option<&SdkLoggerProvider>) {
    let otel_spans = tracing_opentelemetry::layer().with_tracer(tracer);
    let otel_logs = logger.map(|p| {
        let mut quiet = Targets::new().with_default(tracing::Level::TRACE);
        for t in QUIET.iter().chain(&["sockudo::telemetry::export"]) {
            quiet = quiet.with_target(*t, tracing_subscriber::filter::LevelFilter::OFF);
        }
        opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(p).with_filter(quiet)
    });
    let fmt_layer = match config.log_format {
        // FlatJson reads no span fields, so spans get no formatted-field copy either: the fmt
        // layer would otherwise render every span's fields (with ANSI styling) on creation,
        // which showed as ~4% of server CPU on the publish path.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .with_ansi(false)
            .fmt_fields(NoFields)
            .event_format(FlatJson)
            .boxed(),
        // Colours only for a terminal: piped to a file or a collector they are noise (and
        // styling every span's fields costs CPU on busy paths).
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
    };
    let result =
        tracing_subscriber::registry().with(filter(config)).with(otel_spans).with(otel_logs).with(fmt_layer).try_init();
    // An error only means a subscriber is already installed.
    drop(result);
}

/// One flat JSON object per line.
struct FlatJson;

/// Formats no span fields (FlatJson writes an event's own fields and the trace context).
struct NoFields;

impl<'w> FormatFields<'w> for NoFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(&self, _: Writer<'w>, _: R) -> fmt::Result {
        Ok(())
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut map = Map::new();
        let mut ts = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        map.insert("timestamp".into(), Value::from(ts));
        map.insert("level".into(), Value::from(event.metadata().level().as_str()));
        map.insert("target".into(), Value::from(event.metadata().target()));
        event.record(&mut Fields(&mut map));
        if ctx.lookup_current().is_some() {
            let cx = tracing::Span::current().context();
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                map.insert("trace_id".into(), Value::from(sc.trace_id().to_string()));
                map.insert("span_id".into(), Value::from(sc.span_id().to_string()));
            }
        }
        writeln!(writer, "{}", Value::Object(map))
    }
}

/// A log line budget for lines that unauthenticated traffic can cause (refused connections,
/// failed API and channel authentication): the first line, then at most one per second,
/// carrying how many were left out since the last one. A flood then writes a line a second,
/// not a disk-filling stream; the counters of those events stay exact. Lock-free and `const`
/// constructible, so each call site keeps its own `static`.
pub struct Sparse {
    /// Milliseconds since `epoch()` at which the next line may be written.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

/// The interval between two lines of one [`Sparse`] budget.
const SPARSE_INTERVAL_MS: u64 = 1000;

impl Sparse {
    pub const fn new() -> Self {
        Self { next_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(lines left out since the last one)` when a line may be written now; otherwise
    /// counts this one as left out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed().as_millis() as u64)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(next, now_ms + SPARSE_INTERVAL_MS, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Sparse {
    fn default() -> Self {
        Self::new()
    }
}

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

#[cfg(test)]
mod sparse_tests {
    use super::Sparse;

    #[test]
    fn first_then_one_per_second_with_the_count() {
        let s = Sparse::new();
        assert_eq!(s.admit_at(5), Some(0));
        for t in [6, 100, 1004] {
            assert_eq!(s.admit_at(t), None, "{t}");
        }
        assert_eq!(s.admit_at(1005), Some(3), "the next line says three were left out");
        assert_eq!(s.admit_at(1006), None);
        assert_eq!(s.admit_at(10_000), Some(1));
    }
}
