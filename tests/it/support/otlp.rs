//! A real OTLP receiver for tests: the collector services of `opentelemetry-proto` over tonic
//! (gRPC) and the same messages over HTTP/protobuf, storing what the server pushes.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Received {
    pub traces: Vec<ExportTraceServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    pub logs: Vec<ExportLogsServiceRequest>,
    /// `Content-Type` of every OTLP/HTTP request, to tell protobuf from JSON.
    pub content_types: Vec<String>,
}

/// An OTLP/HTTP body as protobuf or, with `Content-Type: application/json`, as OTLP JSON;
/// the answer in the same encoding.
fn decode<T>(got: &Mutex<Received>, headers: &axum::http::HeaderMap, body: &[u8]) -> (T, bool)
where
    T: Message + Default + serde::de::DeserializeOwned,
{
    let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let json = kind.starts_with("application/json");
    got.lock().unwrap().content_types.push(kind);
    let request = if json { serde_json::from_slice(body).unwrap() } else { T::decode(body).unwrap() };
    (request, json)
}

fn answer<R: Message + Default + serde::Serialize>(json: bool) -> axum::response::Response {
    use axum::response::IntoResponse;
    if json {
        ([("content-type", "application/json")], serde_json::to_vec(&R::default()).unwrap()).into_response()
    } else {
        ([("content-type", "application/x-protobuf")], R::default().encode_to_vec()).into_response()
    }
}

#[derive(Clone, Default)]
pub struct Receiver {
    pub got: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().traces.push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().metrics.push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().logs.push(req.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Serves gRPC on a free port; returns the receiver and `http://127.0.0.1:PORT`.
    pub async fn grpc() -> (Self, String) {
        let rx = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(rx.clone()))
            .add_service(MetricsServiceServer::new(rx.clone()))
            .add_service(LogsServiceServer::new(rx.clone()));
        tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
        (rx, format!("http://{addr}"))
    }

    /// Serves OTLP/HTTP, protobuf or JSON (`/v1/traces`, `/v1/metrics`, `/v1/logs`), on a free
    /// port.
    pub async fn http() -> (Self, String) {
        let rx = Self::default();
        let (t, m, l) = (rx.clone(), rx.clone(), rx.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                post(move |headers: axum::http::HeaderMap, body: Bytes| async move {
                    let (req, json) = decode::<ExportTraceServiceRequest>(&t.got, &headers, &body);
                    t.got.lock().unwrap().traces.push(req);
                    answer::<ExportTraceServiceResponse>(json)
                }),
            )
            .route(
                "/v1/metrics",
                post(move |headers: axum::http::HeaderMap, body: Bytes| async move {
                    let (req, json) = decode::<ExportMetricsServiceRequest>(&m.got, &headers, &body);
                    m.got.lock().unwrap().metrics.push(req);
                    answer::<ExportMetricsServiceResponse>(json)
                }),
            )
            .route(
                "/v1/logs",
                post(move |headers: axum::http::HeaderMap, body: Bytes| async move {
                    let (req, json) = decode::<ExportLogsServiceRequest>(&l.got, &headers, &body);
                    l.got.lock().unwrap().logs.push(req);
                    answer::<ExportLogsServiceResponse>(json)
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (rx, format!("http://{addr}"))
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        let got = self.got.lock().unwrap();
        got.traces
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|rs| rs.scope_spans.iter())
            .flat_map(|ss| ss.spans.iter().cloned())
            .collect()
    }

    /// Every metric name received so far.
    pub fn metric_names(&self) -> Vec<String> {
        let got = self.got.lock().unwrap();
        got.metrics
            .iter()
            .flat_map(|r| r.resource_metrics.iter())
            .flat_map(|rm| rm.scope_metrics.iter())
            .flat_map(|sm| sm.metrics.iter().map(|m| m.name.clone()))
            .collect()
    }

    /// The resource attributes of every export request, as strings.
    pub fn resources(&self) -> Vec<Vec<(String, String)>> {
        let got = self.got.lock().unwrap();
        let trace = got.traces.iter().flat_map(|r| r.resource_spans.iter().filter_map(|rs| rs.resource.clone()));
        let metric = got.metrics.iter().flat_map(|r| r.resource_metrics.iter().filter_map(|rm| rm.resource.clone()));
        let log = got.logs.iter().flat_map(|r| r.resource_logs.iter().filter_map(|rl| rl.resource.clone()));
        trace.chain(metric).chain(log).map(|r| r.attributes.iter().map(kv_string).collect()).collect()
    }

    /// `(trace_id hex, body)` of every log record received so far.
    pub fn log_records(&self) -> Vec<(String, String)> {
        let got = self.got.lock().unwrap();
        got.logs
            .iter()
            .flat_map(|r| r.resource_logs.iter())
            .flat_map(|rl| rl.scope_logs.iter())
            .flat_map(|sl| sl.log_records.iter())
            .map(|lr| {
                let body = lr.body.as_ref().map(|b| any_string(b.value.as_ref())).unwrap_or_default();
                (hex(&lr.trace_id), body)
            })
            .collect()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn any_string(v: Option<&any_value::Value>) -> String {
    match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

pub fn kv_string(kv: &KeyValue) -> (String, String) {
    (kv.key.clone(), any_string(kv.value.as_ref().and_then(|v| v.value.as_ref())))
}

/// One attribute of a span, as a string.
pub fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).map(|kv| kv_string(kv).1)
}
