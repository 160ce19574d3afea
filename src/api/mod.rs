//! The signed Pusher HTTP API and the health endpoints, as axum handlers. Every request is
//! counted (rejected ones too) under its app, or `unknown` before the app is resolved; errors
//! are JSON `{"error": "..."}` with the status their [`ApiError`] variant maps to.

mod error;

pub use error::ApiError;

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State as AxumState};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::auth::{self, SignedRequest};
use crate::channels::ChannelInfo;
use crate::protocol::rest::{self, PublishEvent};
use crate::protocol::{ChannelKind, ChannelName};
use crate::state::State;
use crate::telemetry::logs::Sparse;

type S = AxumState<Arc<State>>;

/// The outcome of a request: the app it was attributed to and the JSON answer.
struct Outcome {
    app: Option<Arc<App>>,
    result: Result<Value, ApiError>,
}

impl Outcome {
    fn unknown(err: ApiError) -> Self {
        Self { app: None, result: Err(err) }
    }
}

/// Records the request in the HTTP metrics and renders it.
fn finish(state: &State, request_bytes: usize, outcome: Outcome) -> Response {
    let limited = match &outcome.result {
        Err(ApiError::RateLimited(d)) => Some(*d),
        _ => None,
    };
    let (status, body) = match outcome.result {
        Ok(v) => (StatusCode::OK, v.to_string()),
        Err(e) => {
            // Anyone can send unsigned requests: a line a second at most (counted exactly).
            static LOG: Sparse = Sparse::new();
            if e.status() == StatusCode::UNAUTHORIZED {
                if let Some(suppressed) = LOG.admit() {
                    tracing::info!(
                        app_id = outcome.app.as_ref().map(|a| a.id.as_str()).unwrap_or("unknown"),
                        reason = %e,
                        suppressed,
                        "api authentication failed"
                    );
                }
            }
            (e.status(), json!({ "error": e.to_string() }).to_string())
        }
    };
    let attrs = outcome.app.as_ref().map(|a| &a.attrs).unwrap_or_else(|| state.metrics.unknown());
    state.metrics.http_call(attrs, request_bytes as u64, body.len() as u64);
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(app) = &outcome.app {
        response.extensions_mut().insert(crate::telemetry::trace::RequestApp(app.id.clone()));
    }
    if let Some(d) = limited {
        let h = response.headers_mut();
        h.insert(header::RETRY_AFTER, d.reset_after.into());
        h.insert("x-ratelimit-limit", d.limit.into());
        h.insert("x-ratelimit-remaining", d.remaining.into());
        h.insert("x-ratelimit-reset", d.reset_after.into());
    }
    response
}

/// Which API budget a request spends.
#[derive(Clone, Copy)]
enum Budget {
    Events(u32),
    Read,
}

/// Checks the app's API rate limit; refusals are 429 with `Retry-After` and `X-RateLimit-*`.
async fn spend(state: &State, app: &App, budget: Budget) -> Result<(), ApiError> {
    let (limit, cost, kind) = match budget {
        Budget::Events(n) => (app.settings.max_backend_events_per_second, n, "events"),
        Budget::Read => (app.settings.max_read_requests_per_second, 1, "reads"),
    };
    if limit == 0 {
        return Ok(());
    }
    let decision = state.limiter.check(&format!("api:{}:{kind}", app.id), limit, cost).await;
    state.metrics.rate_limit(&app.attrs, crate::telemetry::Limiter::HttpApi, !decision.allowed);
    if decision.allowed {
        Ok(())
    } else {
        Err(ApiError::RateLimited(decision))
    }
}

/// Reads the body, refusing (413) as soon as it passes the limit rather than after buffering.
async fn read_body(state: &State, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.config.http_api.max_body_kb * 1024;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit exceeded");
        if too_large {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Resolves the app and checks the request signature.
async fn authenticate(
    state: &State,
    app_id: &str,
    method: &Method,
    uri: &Uri,
    query: Option<&str>,
    body: &[u8],
) -> Result<Arc<App>, (Option<Arc<App>>, ApiError)> {
    let app = match state.apps.lookup_by_id(app_id).await {
        Ok(Some(app)) => app,
        Ok(None) => return Err((None, ApiError::AppNotFound)),
        Err(_) => return Err((None, ApiError::AppLookupFailed)),
    };
    tracing::Span::current().record("sockudo.app_id", app.id.as_str());
    let req = SignedRequest { method: method.as_str(), path: uri.path(), query: query.unwrap_or(""), body };
    if let Err(e) = auth::verify_api_request(
        &app.key,
        app.secret(),
        &req,
        now_unix(),
        state.config.http_api.timestamp_tolerance_seconds,
    ) {
        let err = match e {
            auth::ApiAuthError::Duplicate(_) => ApiError::BadRequest(e.to_string()),
            other => ApiError::Unauthorized(other),
        };
        return Err((Some(app), err));
    }
    if !app.settings.enabled {
        return Err((Some(app), ApiError::AppDisabled));
    }
    Ok(app)
}

/// Runs `f` for an authenticated app and renders the outcome.
async fn signed<F, Fut>(state: &State, app_id: &str, req: Request, f: F) -> Response
where
    F: FnOnce(Arc<App>, Bytes) -> Fut,
    Fut: Future<Output = Result<Value, ApiError>>,
{
    let (parts, body) = req.into_parts();
    let body = match read_body(state, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return finish(state, 0, Outcome::unknown(e)),
    };
    let outcome = match authenticate(state, app_id, &parts.method, &parts.uri, parts.uri.query(), &body).await {
        Ok(app) => {
            let result = f(app.clone(), body.clone()).await;
            Outcome { app: Some(app), result }
        }
        Err((app, err)) => Outcome { app, result: Err(err) },
    };
    finish(state, body.len(), outcome)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn info_fields(info: Option<String>) -> Vec<String> {
    info.map(|i| i.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
}

/// The requested attributes of one channel's cluster-wide counts.
fn attributes(counts: &ChannelInfo, info: &[String]) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    for field in info {
        match field.as_str() {
            "subscription_count" => {
                out.insert(field.clone(), json!(counts.subscription_count));
            }
            "user_count" if counts.presence => {
                out.insert(field.clone(), json!(counts.user_count));
            }
            "user_count" => {
                return Err(ApiError::BadRequest("user_count is only available for presence channels".into()))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Refuses `info` attributes a channel cannot have, before anything is published.
fn check_info(event: &PublishEvent) -> Result<(), ApiError> {
    let wants_users = event.info.iter().any(|f| f == "user_count");
    if wants_users && event.channels.iter().any(|c| c.kind() != ChannelKind::Presence) {
        return Err(ApiError::BadRequest("user_count is only available for presence channels".into()));
    }
    Ok(())
}

async fn publish(state: &State, app: &Arc<App>, event: &PublishEvent, started: Instant) -> Result<Value, ApiError> {
    state.adapter.publish(app, event, started);
    if event.info.is_empty() {
        return Ok(json!({}));
    }
    let mut channels = Map::new();
    for c in &event.channels {
        let counts = state.adapter.channel_info(app, c).await;
        channels.insert(c.as_str().to_owned(), Value::Object(attributes(&counts, &event.info)?));
    }
    Ok(json!({ "channels": channels }))
}

/// `POST /apps/{app_id}/events`.
pub async fn events(AxumState(state): S, Path(app_id): Path<String>, req: Request) -> Response {
    let started = Instant::now();
    let st = state.clone();
    signed(&state, &app_id, req, |app, body| async move {
        let event = rest::parse_event(&body, &app.publish_limits())?;
        check_info(&event)?;
        spend(&st, &app, Budget::Events(1)).await?;
        publish(&st, &app, &event, started).await
    })
    .await
}

/// `POST /apps/{app_id}/batch_events`.
pub async fn batch_events(AxumState(state): S, Path(app_id): Path<String>, req: Request) -> Response {
    let started = Instant::now();
    let st = state.clone();
    signed(&state, &app_id, req, |app, body| async move {
        let events = rest::parse_batch(&body, &app.publish_limits())?;
        // The whole batch is checked before any of it is published.
        events.iter().try_for_each(check_info)?;
        spend(&st, &app, Budget::Events(events.len() as u32)).await?;
        let mut infos = Vec::with_capacity(events.len());
        let mut any_info = false;
        for event in &events {
            let answer = publish(&st, &app, event, started).await?;
            any_info |= !event.info.is_empty();
            let attrs = event
                .channels
                .first()
                .and_then(|c| answer.get("channels").and_then(|m| m.get(c.as_str())).cloned())
                .unwrap_or_else(|| json!({}));
            infos.push(attrs);
        }
        Ok(if any_info { json!({ "batch": infos }) } else { json!({}) })
    })
    .await
}

/// `GET /apps/{app_id}/channels`.
pub async fn channels(AxumState(state): S, Path(app_id): Path<String>, req: Request) -> Response {
    let prefix = query_param(req.uri().query(), "filter_by_prefix").unwrap_or_default();
    let info = info_fields(query_param(req.uri().query(), "info"));
    let st = state.clone();
    signed(&state, &app_id, req, |app, _| async move {
        spend(&st, &app, Budget::Read).await?;
        if info.iter().any(|f| f == "user_count") && !prefix.starts_with("presence-") {
            return Err(ApiError::BadRequest("info=user_count requires filter_by_prefix=presence-".into()));
        }
        let mut out = Map::new();
        for c in st.adapter.channel_list(&app, &prefix).await {
            out.insert(c.name.to_string(), Value::Object(attributes(&c, &info)?));
        }
        Ok(json!({ "channels": out }))
    })
    .await
}

fn channel_path(app: &App, name: &str) -> Result<ChannelName, ApiError> {
    ChannelName::parse(name, app.settings.max_channel_name_length).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// `GET /apps/{app_id}/channels/{channel}`.
pub async fn channel(AxumState(state): S, Path((app_id, name)): Path<(String, String)>, req: Request) -> Response {
    let info = info_fields(query_param(req.uri().query(), "info"));
    let st = state.clone();
    signed(&state, &app_id, req, |app, _| async move {
        spend(&st, &app, Budget::Read).await?;
        let channel = channel_path(&app, &name)?;
        let counts = st.adapter.channel_info(&app, &channel).await;
        let mut out = attributes(&counts, &info)?;
        out.insert("occupied".into(), json!(counts.subscription_count > 0));
        Ok(Value::Object(out))
    })
    .await
}

/// `GET /apps/{app_id}/channels/{channel}/users`.
pub async fn channel_users(
    AxumState(state): S,
    Path((app_id, name)): Path<(String, String)>,
    req: Request,
) -> Response {
    let st = state.clone();
    signed(&state, &app_id, req, |app, _| async move {
        spend(&st, &app, Budget::Read).await?;
        let channel = channel_path(&app, &name)?;
        if channel.kind() != ChannelKind::Presence {
            return Err(ApiError::BadRequest("users are only available for presence channels".into()));
        }
        let users: Vec<Value> = st.adapter.members(&app, &channel).into_iter().map(|id| json!({ "id": id })).collect();
        Ok(json!({ "users": users }))
    })
    .await
}

/// `POST /apps/{app_id}/users/{user_id}/terminate_connections`.
pub async fn terminate_user(
    AxumState(state): S,
    Path((app_id, user_id)): Path<(String, String)>,
    req: Request,
) -> Response {
    let st = state.clone();
    signed(&state, &app_id, req, |app, _| async move {
        let closed = st.adapter.terminate_user(&app, &user_id);
        tracing::info!(app_id = %app.id, sockets = closed, "terminated a user's connections");
        Ok(json!({}))
    })
    .await
}

fn not_ready_reason(state: &State) -> &'static str {
    if state.is_draining() {
        "DRAINING"
    } else if !state.adapter.is_connected() {
        "BROKER UNAVAILABLE"
    } else {
        "WEBHOOK QUEUE UNAVAILABLE"
    }
}

/// `GET /up`: ready unless draining or cut off from the cluster's broker.
pub async fn up(AxumState(state): S) -> Response {
    if !state.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, not_ready_reason(&state)).into_response()
    } else {
        (StatusCode::OK, "OK").into_response()
    }
}

/// `GET /up/{app_id}`: ready and the app exists and is enabled.
pub async fn up_app(AxumState(state): S, Path(app_id): Path<String>) -> Response {
    if !state.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, not_ready_reason(&state)).into_response();
    }
    match state.apps.lookup_by_id(&app_id).await {
        Ok(Some(app)) if app.settings.enabled => (StatusCode::OK, "OK").into_response(),
        Ok(Some(_)) => (StatusCode::SERVICE_UNAVAILABLE, "APP DISABLED").into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "APP NOT FOUND").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "APP LOOKUP FAILED").into_response(),
    }
}

/// `GET /live`: the process is alive.
pub async fn live() -> Response {
    (StatusCode::OK, "OK").into_response()
}

/// A known path with the wrong method: 405 JSON, counted under `unknown`.
pub async fn method_not_allowed(AxumState(state): S) -> Response {
    finish(&state, 0, Outcome::unknown(ApiError::MethodNotAllowed))
}

/// Anything else: 404 JSON, counted under `unknown`.
pub async fn not_found(AxumState(state): S) -> Response {
    finish(&state, 0, Outcome::unknown(ApiError::NotFound))
}
