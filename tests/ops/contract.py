"""The telemetry contract (shared/reference/metrics.md, section 1) in machine-readable form.

Used by the asset tests (test_assets.py), the PromQL extractor's name check and the fake
exporter that live.sh can be pointed at.  Keep in sync with the contract: test_assets.py
cross-checks this list against metrics.md when that file is reachable.
"""

CHANNEL_TYPES = ["public", "private", "presence", "private_encrypted", "cache"]
RECIPIENT_COUNT_BUCKETS = ["xs", "sm", "md", "lg", "xl"]
ERROR_TYPES = [
    "app_not_found", "app_disabled", "over_quota", "over_capacity", "origin_not_allowed",
    "invalid_message", "message_too_large", "pong_timeout", "slow_consumer", "auth_timeout",
]
LIMITER_TYPES = ["http_api", "websocket_connect", "client_events"]
REQUEST_CONTEXTS = ["http_api", "websocket_upgrade", "websocket_message"]
ADAPTERS = ["local", "redis", "nats"]
WEBHOOK_OUTCOMES = ["delivered", "retried", "failed", "dropped"]

BROADCAST_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
ADAPTER_RESOLVE_BUCKETS = [0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
HTTP_DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
EXPORT_SIGNALS = ["traces", "metrics", "logs"]
# (direction, reason) pairs of horizontal_adapter_dropped_total
DROP_KINDS = [("in", "queue_full"), ("out", "queue_full"), ("in", "decode"), ("in", "unauthenticated")]

# name -> (type, labels the server sets; Prometheus adds job/instance on scrape)
METRICS = {
    # 1.2 seed metrics: every sockudo_ series carries app_id and port
    "sockudo_connected": ("gauge", ["app_id", "port"]),
    "sockudo_new_connections_total": ("counter", ["app_id", "port"]),
    "sockudo_new_disconnections_total": ("counter", ["app_id", "port"]),
    "sockudo_connection_errors_total": ("counter", ["app_id", "port", "error_type"]),
    "sockudo_socket_received_bytes": ("counter", ["app_id", "port"]),
    "sockudo_socket_transmitted_bytes": ("counter", ["app_id", "port"]),
    "sockudo_ws_messages_received_total": ("counter", ["app_id", "port"]),
    "sockudo_ws_messages_sent_total": ("counter", ["app_id", "port"]),
    "sockudo_http_calls_received_total": ("counter", ["app_id", "port"]),
    "sockudo_http_received_bytes": ("counter", ["app_id", "port"]),
    "sockudo_http_transmitted_bytes": ("counter", ["app_id", "port"]),
    "sockudo_channel_subscriptions_total": ("counter", ["app_id", "port", "channel_type"]),
    "sockudo_channel_unsubscriptions_total": ("counter", ["app_id", "port", "channel_type"]),
    "sockudo_active_channels": ("gauge", ["app_id", "port", "channel_type"]),
    "sockudo_rate_limit_checks_total": ("counter", ["app_id", "port", "limiter_type", "request_context"]),
    "sockudo_rate_limit_triggered_total": ("counter", ["app_id", "port", "limiter_type", "request_context"]),
    "sockudo_broadcast_latency_ms": ("histogram", ["app_id", "port", "channel_type", "recipient_count_bucket"]),
    "sockudo_horizontal_adapter_resolve_time": ("histogram", ["app_id", "port"]),
    "sockudo_horizontal_adapter_resolved_promises": ("counter", ["app_id", "port"]),
    "sockudo_horizontal_adapter_uncomplete_promises": ("counter", ["app_id", "port"]),
    "sockudo_horizontal_adapter_sent_requests": ("counter", ["app_id", "port"]),
    "sockudo_horizontal_adapter_received_requests": ("counter", ["app_id", "port"]),
    "sockudo_horizontal_adapter_received_responses": ("counter", ["app_id", "port"]),
    # 1.3 metrics we add (labels exactly as listed there: no app_id on the node-level ones)
    "sockudo_build_info": ("gauge", ["port", "version"]),
    "sockudo_horizontal_adapter_connected": ("gauge", ["port", "adapter"]),
    "sockudo_horizontal_adapter_nodes": ("gauge", ["port", "adapter"]),
    "sockudo_horizontal_adapter_dropped_total": ("counter", ["port", "adapter", "direction", "reason"]),
    "sockudo_webhooks_total": ("counter", ["app_id", "port", "outcome"]),
    # 1.6 metrics added so far
    "sockudo_cache_channel_bytes": ("gauge", ["app_id", "port"]),
    "sockudo_cache_channel_evictions_total": ("counter", ["app_id", "port"]),
    "sockudo_webhook_queue_events": ("gauge", ["app_id", "port"]),
    "sockudo_http_server_request_duration_seconds": (
        "histogram", ["app_id", "port", "method", "route", "status_class"]),
    "sockudo_socket_send_queue_bytes": ("gauge", ["app_id", "port"]),
    "sockudo_telemetry_export_failures_total": ("counter", ["port", "signal"]),
    "sockudo_runtime_workers": ("gauge", ["port"]),
    "sockudo_runtime_alive_tasks": ("gauge", ["port"]),
    "sockudo_runtime_global_queue_depth": ("gauge", ["port"]),
    "sockudo_runtime_worker_busy_seconds_total": ("counter", ["port"]),
    "process_resident_memory_bytes": ("gauge", []),
    "process_cpu_seconds_total": ("counter", []),
    "process_open_fds": ("gauge", []),
    "process_max_fds": ("gauge", []),
    "process_start_time_seconds": ("gauge", []),
}

# JSON log line fields (contract section 4) plus what Filebeat/Logstash add.
# Families of the contract's section 1.6 not built yet, with the issue that builds them. No
# shipped asset may query them (test_assets.py checks every expression against METRICS), and the
# Rust contract test fails if the server serves one that is still listed here.
NOT_YET_EMITTED = {
}

LOG_FIELDS = {"timestamp", "level", "message", "target", "trace_id", "span_id"}
PIPELINE_FIELDS = {"@timestamp", "service", "environment"}
LOG_LEVELS = {"ERROR", "WARN", "INFO", "DEBUG", "TRACE"}


def series_names():
    """Every series name that can appear on /metrics (histograms expanded)."""
    out = {}
    for name, (typ, labels) in METRICS.items():
        if typ == "histogram":
            out[name + "_bucket"] = labels + ["le"]
            out[name + "_sum"] = labels
            out[name + "_count"] = labels
        else:
            out[name] = labels
    return out


def has_app_id(series_name):
    labels = series_names().get(series_name)
    return labels is not None and "app_id" in labels
