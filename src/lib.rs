//! sockudo: a fast, Pusher-protocol-compatible WebSocket server whose observability is
//! OpenTelemetry-first. `server::run` is the entry point; `docs/ARCHITECTURE.md` maps the
//! modules and the path of a message from the REST API to a socket.

pub mod adapter;
pub mod api;
pub mod app;
pub mod auth;
pub mod channels;
pub mod config;
pub mod connection;
// Glue for the cargo-fuzz targets in fuzz/ and their stable replay in tests/it; not an API.
#[doc(hidden)]
pub mod fuzz_targets;
pub mod nats_client;
pub mod outbox;
pub mod protocol;
pub mod rate_limit;
pub mod redis_client;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod webhooks;

#[cfg(test)]
mod tests {
    /// STYLE practice 2: every source file starts with a `//!` paragraph saying what it is for.
    #[test]
    fn every_source_file_has_a_module_doc() {
        fn walk(dir: &std::path::Path, missing: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, missing);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    if !text.trim_start().starts_with("//!") {
                        missing.push(path.display().to_string());
                    }
                }
            }
        }
        let mut missing = Vec::new();
        walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut missing);
        assert!(missing.is_empty(), "files without a //! module doc: {missing:?}");
    }
}
