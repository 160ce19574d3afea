//! Log output: `tracing-subscriber` writing text or flat JSON lines to stdout, filtered by
//! `LOG_LEVEL` (or `RUST_LOG` when set, which takes a full filter).

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber once; later calls (tests starting several servers) are no-ops.
pub fn init(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(config.effective_log_level()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    let result = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // An error only means a subscriber is already installed.
    drop(result);
}
