//! The composition root: `run(config, listeners, shutdown)` builds the state, serves the
//! WebSocket + API listener and the metrics listener, and on shutdown stops accepting, closes
//! sockets with 4200 and waits for them within the grace period.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::adapter::Adapter;
use crate::app::AppManager;
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::telemetry::{Telemetry, PROMETHEUS_CONTENT_TYPE};
use crate::tls::Tls;
use crate::webhooks::Webhooks;
use crate::{api, connection};

/// The bound listeners the server runs on (tests bind port 0 and pass them in).
pub struct Listeners {
    pub main: TcpListener,
    /// `None` when metrics are disabled.
    pub metrics: Option<TcpListener>,
}

/// `GET /app`, `/app/` or `/app/{key}/...`: a WebSocket gets 4005; any other request the API's
/// JSON 404.
async fn bad_app_path(
    ws: Result<axum::extract::ws::WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    axum::extract::State(state): axum::extract::State<Arc<State>>,
) -> Response {
    match ws {
        Ok(ws) => connection::bad_path(ws, state),
        Err(_) => api::not_found(axum::extract::State(state)).await,
    }
}

/// The HTTP + WebSocket routes.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/app/{key}", get(connection::upgrade))
        .route("/app", get(bad_app_path))
        .route("/app/", get(bad_app_path))
        .route("/app/{key}/{*rest}", get(bad_app_path))
        .route("/apps/{app_id}/events", post(api::events))
        .route("/apps/{app_id}/batch_events", post(api::batch_events))
        .route("/apps/{app_id}/channels", get(api::channels))
        .route("/apps/{app_id}/channels/{channel}", get(api::channel))
        .route("/apps/{app_id}/channels/{channel}/users", get(api::channel_users))
        .route("/apps/{app_id}/users/{user_id}/terminate_connections", post(api::terminate_user))
        .route("/up", get(api::up))
        .route("/up/{app_id}", get(api::up_app))
        .route("/live", get(api::live))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.metrics.clone(), crate::telemetry::trace::http_span))
        .with_state(state)
}

fn metrics_router(telemetry: Arc<Telemetry>, state: Arc<State>) -> Router {
    Router::new()
        .route("/stats", get(move || std::future::ready(axum::Json(stats(&state)))))
        .route(
            "/metrics",
            get(move || {
                let t = telemetry.clone();
                async move { ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], t.render()).into_response() }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found").into_response() })
}

/// Serves HTTP/1.1 (with upgrades) on `listener` until shutdown, over TLS when `tls` is set.
/// Unlike `axum::serve`, this installs hyper's timer so that a request head must arrive within
/// `header_timeout` (slowloris sockets are dropped; a TLS handshake gets the same time), and
/// sets `TCP_NODELAY` so small frames leave at once.
async fn serve_http(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
    header_timeout: Duration,
    tls: Option<Arc<Tls>>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    let builder = Arc::new(builder);
    let connections = crate::shutdown::Tracker::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let (router, builder, tls, stop) = (router.clone(), builder.clone(), tls.clone(), shutdown.clone());
        let token = connections.token();
        tokio::spawn(async move {
            let _token = token;
            match tls {
                None => serve_connection(&builder, stream, router, peer, "http", stop).await,
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(&builder, stream, router, peer, "https", stop).await,
                    // Expected churn on a public port (scanners, plain-text clients, timeouts).
                    Ok(Err(err)) => tracing::debug!(error = %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    connections.wait_idle().await;
}

/// One HTTP/1.1 connection (plain or TLS) until it ends or shutdown asks it to finish.
async fn serve_connection<I>(
    builder: &hyper::server::conn::http1::Builder,
    io: I,
    router: Router,
    peer: Option<std::net::SocketAddr>,
    scheme: &'static str,
    stop: Shutdown,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Handlers see the peer address as axum's `ConnectInfo` (connection rate limits), and the
    // HTTP span the scheme (`url.scheme`).
    let service = hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
        router,
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            if let Some(addr) = peer {
                req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
            }
            req.extensions_mut().insert(crate::telemetry::trace::Scheme(scheme));
            req
        },
    ));
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// `GET /stats` on the metrics listener: the node's true counts and process resources as JSON,
/// for soak and churn checks (is the gauge equal to the real number? are tasks and file
/// descriptors back to the baseline?). Values the platform cannot give are `null`.
fn stats(state: &State) -> serde_json::Value {
    let (channels, presence_members) = state.adapter.local_counts();
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
    serde_json::json!({
        "connections": state.connection_count(),
        "socket_tasks": state.sockets.live(),
        "channels": channels,
        "presence_members": presence_members,
        "tokio_tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        "open_fds": open_fds,
        "rss_bytes": resident_bytes(),
    })
}

/// This process's resident memory (`VmRSS` of `/proc/self/status`); `None` off Linux.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the server until `shutdown` resolves, then drains within the grace period.
pub async fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let port = listeners.main.local_addr()?.port();
    // Certificates are configuration: a bad pair stops startup (exit 64) before anything serves.
    let main_tls = Tls::from_config(&config.ssl, "ssl")?;
    let metrics_tls = Tls::from_config(&config.metrics.ssl, "metrics.ssl")?;
    let node_id = format!("{:016x}", fastrand::u64(..));
    let telemetry = Telemetry::new(&config, port, &node_id)?;
    telemetry.install_logging(&config);
    let telemetry = Arc::new(telemetry);
    let metrics = telemetry.metrics.clone();
    // An unreachable app database or a missing apps table is a ConfigError (exit 64), like a broker.
    let apps = Arc::new(AppManager::connect(&config, &metrics).await?);
    let webhooks = Webhooks::start(&config, metrics.clone(), apps.clone(), &node_id).await?;
    let (adapter, inbox) = Adapter::connect(&config, &node_id, metrics.clone(), apps.clone()).await?;
    let adapter = Arc::new(adapter.with_webhooks(Some(webhooks.clone())));
    let cluster = inbox.map(|inbox| tokio::spawn(adapter.clone().run(inbox, shutdown.clone())));
    let limiter = match config.rate_limits.driver.as_str() {
        "redis" => crate::rate_limit::RateLimiter::redis(&config.adapter.redis)
            .await
            .map_err(|e| crate::config::ConfigError::new(e.key, format!("rate_limits.driver redis: {e}")))?,
        _ => crate::rate_limit::RateLimiter::memory(),
    };
    let state = Arc::new(State::new(config.clone(), apps, adapter.clone(), metrics, limiter, shutdown.clone()));

    let sweeper = {
        let adapter = adapter.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => adapter.sweep_caches(),
                    _ = shutdown.wait() => break,
                }
            }
        })
    };

    // Memory admission control samples the resident size twice a second (a file read), so the
    // accept path only loads an atomic.
    let sampler = (config.max_memory_mb > 0).then(|| {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Some(rss) = resident_bytes() {
                            state.rss_bytes.store(rss, Ordering::Relaxed);
                        }
                    }
                    _ = shutdown.wait() => break,
                }
            }
        })
    });

    // Apps from a database change at run time: the apps open sockets hold are read again about
    // once per cache TTL, and a changed or removed app tells its sockets.
    let refresher = state.apps.refresh_every().map(|every| {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => state.apps.refresh_in_use().await,
                    _ = shutdown.wait() => break,
                }
            }
        })
    });

    let metrics_server = match listeners.metrics {
        Some(listener) if telemetry.prometheus_enabled() => {
            let router = metrics_router(telemetry.clone(), state.clone());
            let stop = shutdown.clone();
            tracing::info!(addr = %listener.local_addr()?, tls = metrics_tls.is_some(), "metrics listening");
            Some(tokio::spawn(serve_http(listener, router, stop, Duration::from_secs(10), metrics_tls.clone())))
        }
        _ => None,
    };

    let reloader = tokio::spawn(crate::tls::reload_on_change(
        main_tls.iter().chain(metrics_tls.iter()).cloned().collect(),
        shutdown.clone(),
    ));
    tracing::info!(
        addr = %listeners.main.local_addr()?, tls = main_tls.is_some(), version = env!("CARGO_PKG_VERSION"),
        "sockudo listening"
    );
    let header_timeout = Duration::from_secs(config.http_api.header_read_timeout_seconds);
    let main =
        tokio::spawn(serve_http(listeners.main, router(state.clone()), shutdown.clone(), header_timeout, main_tls));

    shutdown.wait().await;
    state.draining.store(true, Ordering::Release);
    let grace = Duration::from_secs(config.shutdown_grace_period);
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(connections = state.connection_count(), grace_s = grace.as_secs(), "shutting down");
    let drained = tokio::time::timeout(grace, async {
        state.sockets.wait_idle().await;
        let _ = main.await;
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(remaining = state.sockets.live(), "shutdown grace period passed with sockets still open");
    }
    sweeper.abort();
    reloader.abort();
    for task in [sampler, refresher].into_iter().flatten() {
        task.abort();
    }
    // After the sockets: their unsubscriptions are the last events. Webhooks get what is left
    // of the grace period, and at least a second to flush.
    webhooks.close(deadline.max(tokio::time::Instant::now() + Duration::from_secs(1))).await;
    if let Some(c) = cluster {
        let _ = tokio::time::timeout(Duration::from_secs(1), c).await;
    }
    drop(state);
    match Arc::try_unwrap(telemetry) {
        Ok(t) => t.shutdown().await,
        Err(_) => tracing::debug!("telemetry still referenced; skipping the final flush"),
    }
    tracing::info!("stopped");
    Ok(())
}
