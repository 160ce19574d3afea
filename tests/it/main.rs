//! The one integration-test binary: every test starts a real server in-process on port 0 and
//! talks to it over real sockets (raw frames, the signed API, and the real Pusher clients).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod api_signing;
mod apps_sql;
mod cache_bounds;
mod clients;
mod cluster;
mod cluster_signing;
mod config;
mod durable_webhooks;
mod fuzz_regressions;
mod hostile;
mod isolation;
mod metrics;
mod metrics_ops;
mod overload;
mod protocol;
mod rate_limits;
mod reliability;
mod secure_links;
mod support;
mod telemetry;
mod tls;
mod watchlist;
mod webhook_fairness;
mod webhooks;
