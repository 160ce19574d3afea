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
pub mod outbox;
pub mod protocol;
pub mod rate_limit;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod webhooks;
