//! One task per WebSocket: the upgrade, the refusals (an error frame, then a close with the
//! same code, so clients stop retrying a wrong key), and the session loop that reads client
//! frames, writes the outbox and keeps the activity timer.

mod fault;
#[cfg(debug_assertions)]
#[doc(hidden)]
pub use fault::panic_on_subscribe;
mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State as AxumState};
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::telemetry::logs::Sparse;
use crate::telemetry::Limiter;
use futures_util::SinkExt;

use crate::app::App;
use crate::protocol::{server, ProtocolError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::state::State;

/// `GET /app/{key}`: upgrades, then runs the session (or refuses with a Pusher code).
pub async fn upgrade(
    ws: WebSocketUpgrade,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    AxumState(state): AxumState<Arc<State>>,
) -> Response {
    let per_ip = state.config.rate_limits.connections_per_ip_per_second;
    if let (Some(axum::Extension(ConnectInfo(addr))), true) = (peer, per_ip > 0) {
        let decision = state.limiter.check(&format!("ip:{}", addr.ip()), per_ip, 1).await;
        // Only what is cached labels the decision: a refused upgrade must not cost a query.
        let app = state.apps.cached_by_key(&key);
        let attrs = app.as_ref().map(|a| &a.attrs).unwrap_or_else(|| state.metrics.unknown());
        state.metrics.rate_limit(attrs, Limiter::WebsocketConnect, !decision.allowed);
        if !decision.allowed {
            static LOG: Sparse = Sparse::new();
            if let Some(suppressed) = LOG.admit() {
                tracing::info!(ip = %addr.ip(), suppressed, "connection refused: connection rate limit");
            }
            let mut r = (StatusCode::TOO_MANY_REQUESTS, "connection rate limit exceeded").into_response();
            r.headers_mut().insert(header::RETRY_AFTER, decision.reset_after.into());
            return r;
        }
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    // The connection's span continues the caller's trace: `traceparent` and `baggage` headers,
    // or (browsers cannot set headers on a WebSocket) query parameters of those names.
    let carried = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned).or_else(|| {
            form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    let trace = (carried("traceparent"), carried("baggage"));
    let c = &state.config.websocket;
    let hard = c.hard_max_message_size_kb * 1024;
    ws.read_buffer_size(c.read_buffer_size)
        .write_buffer_size(c.write_buffer_size)
        // Tungstenite's own buffer may hold one more batch beyond the outbox's cap.
        .max_write_buffer_size(c.write_buffer_size + c.max_queue_kb * 1024 + hard)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| accept(socket, state, key, query, origin, trace))
}

/// A WebSocket to a path that is not `/app/{key}`: upgraded and refused with 4005, as Pusher
/// does, so that the client learns why instead of seeing a failed handshake.
pub fn bad_path(ws: WebSocketUpgrade, state: Arc<State>) -> Response {
    ws.on_upgrade(move |socket| async move {
        let _task = state.sockets.token();
        refuse(socket, &state, None, ProtocolError::PathNotFound).await
    })
}

/// The `protocol` query parameter, checked.
fn protocol_version(query: Option<&str>) -> Result<u8, ProtocolError> {
    let value = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "protocol")
        .map(|(_, v)| v.into_owned())
        .ok_or(ProtocolError::NoProtocolVersion)?;
    let version: u8 = value.parse().map_err(|_| ProtocolError::InvalidVersionFormat)?;
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        Ok(version)
    } else {
        Err(ProtocolError::UnsupportedProtocol)
    }
}

async fn accept(
    ws: WebSocket,
    state: Arc<State>,
    key: String,
    query: Option<String>,
    origin: Option<String>,
    (traceparent, baggage): (Option<String>, Option<String>),
) {
    let _task = state.sockets.token();
    let app = match state.apps.lookup_by_key(&key).await {
        Ok(Some(app)) => app,
        Ok(None) => return refuse(ws, &state, None, ProtocolError::AppNotFound).await,
        Err(_) => return refuse(ws, &state, None, ProtocolError::AppLookupFailed).await,
    };
    if !app.settings.enabled {
        return refuse(ws, &state, Some(&app), ProtocolError::AppDisabled).await;
    }
    if !app.origin_allowed(origin.as_deref()) {
        return refuse(ws, &state, Some(&app), ProtocolError::OriginNotAllowed).await;
    }
    if let Err(err) = protocol_version(query.as_deref()) {
        return refuse(ws, &state, Some(&app), err).await;
    }
    if state.shutdown.is_triggered() {
        return refuse(ws, &state, Some(&app), ProtocolError::ShuttingDown).await;
    }
    let Some(_node_slot) = NodeSlot::acquire(&state).filter(|_| !state.over_memory()) else {
        return refuse(ws, &state, Some(&app), ProtocolError::OverCapacity).await;
    };
    let Some(_app_slot) = AppSlot::acquire(&app) else {
        return refuse(ws, &state, Some(&app), ProtocolError::OverQuota).await;
    };
    session::run(ws, &state, &app, traceparent.as_deref(), baggage.as_deref()).await;
}

/// A node connection slot under `max_connections`, released on drop, so that no way out of a
/// connection task (a panic included) can leak one.
struct NodeSlot<'a>(&'a State);

impl<'a> NodeSlot<'a> {
    fn acquire(state: &'a State) -> Option<Self> {
        // `then`, not `then_some`: a slot built and dropped on refusal would release one it never took.
        state.try_acquire_connection().then(|| Self(state))
    }
}

impl Drop for NodeSlot<'_> {
    fn drop(&mut self) {
        self.0.release_connection();
    }
}

/// An app connection slot under the app's `max_connections`, released on drop.
struct AppSlot<'a>(&'a App);

impl<'a> AppSlot<'a> {
    fn acquire(app: &'a App) -> Option<Self> {
        app.try_acquire_connection().then(|| Self(app))
    }
}

impl Drop for AppSlot<'_> {
    fn drop(&mut self) {
        self.0.release_connection();
    }
}

/// Sends the error frame and a close with the same code, within a short deadline.
async fn refuse(mut ws: WebSocket, state: &State, app: Option<&App>, err: ProtocolError) {
    let attrs = app.map(|a| &a.attrs).unwrap_or_else(|| state.metrics.unknown());
    if let Some(error_type) = err.error_type() {
        state.metrics.connection_error(attrs, error_type);
    }
    // Unauthenticated clients cause these at will: a line a second at most (counted exactly).
    static LOG: Sparse = Sparse::new();
    if let Some(suppressed) = LOG.admit() {
        tracing::info!(app_id = app.map(|a| a.id.as_str()).unwrap_or("unknown"), code = err.code(), reason = %err, suppressed, "connection refused");
    }
    let frame = server::error(&err);
    let bytes = frame.len() as u64;
    let close = CloseFrame { code: err.code(), reason: Utf8Bytes::from(err.to_string()) };
    let send = async {
        ws.feed(Message::Text(Utf8Bytes::from(frame))).await?;
        ws.feed(Message::Close(Some(close))).await?;
        ws.flush().await
    };
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), send).await {
        state.metrics.ws_sent(attrs, 1, bytes);
    }
}
