#!/usr/bin/env python3
"""Generates grafana/dashboards/sockudo-overview.json (the committed file is the product).

  python3 grafana/build_dashboard.py          # rewrite the JSON
  python3 grafana/build_dashboard.py --check  # exit 1 if the committed JSON differs

Every seed panel of docs "Monitoring Sockudo" is here with corrected PromQL, plus panels for the
metrics the contract adds. Selectors: `instance=~"$instance"` on every sockudo/process query,
`app_id=~"$app_id"` on every metric that carries app_id (sockudo_build_info,
sockudo_horizontal_adapter_connected/_nodes/_dropped_total and process_* have no app_id in the
contract),
`instance=~"$node"` on node_exporter queries.
"""
import json
import os
import sys
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards", "sockudo-overview.json")

PROM = {"type": "prometheus", "uid": "prometheus"}
TRACES = {"type": "jaeger", "uid": "traces"}

S = 'instance=~"$instance", app_id=~"$app_id"'   # metrics with app_id
I = 'instance=~"$instance"'                       # node-level sockudo metrics
P = 'job=~"sockudo(-.+)?", instance=~"$instance"'  # process_* of the sockudo targets only
N = 'instance=~"$node"'                            # node_exporter
RI = "$__rate_interval"


def explore_traces_url(operation):
    """Grafana Explore URL opening the traces datasource on sockudo's `operation` spans."""
    panes = {
        "traces": {
            "datasource": "traces",
            "queries": [{
                "refId": "A",
                "datasource": TRACES,
                "queryType": "search",
                "service": "sockudo",
                "operation": operation,
            }],
            "range": {"from": "${__from}", "to": "${__to}"},
        }
    }
    enc = urllib.parse.quote(json.dumps(panes, separators=(",", ":")), safe="${}:,")
    return "/explore?schemaVersion=1&orgId=1&panes=" + enc


class Layout:
    def __init__(self):
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1
        self.panels = []

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0
        self.panels.append({
            "id": self._id(), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def add(self, panel, w, h):
        if self.x + w > 24:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)


def target(expr, legend, ref, fmt=None, instant=False):
    t = {"refId": ref, "datasource": PROM, "expr": expr, "legendFormat": legend,
         "range": not instant, "instant": instant, "editorMode": "code"}
    if fmt:
        t["format"] = fmt
    return t


def _targets(qs):
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(qs)]


def timeseries(title, qs, unit="short", desc="", links=None, stack=False):
    p = {
        "type": "timeseries", "title": title, "description": desc, "datasource": PROM,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                           "showPoints": "never", "spanNulls": False,
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
                "links": links or [],
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(qs),
    }
    if links:
        p["links"] = [{"title": l["title"], "url": l["url"], "targetBlank": False} for l in links]
    return p


def stat(title, qs, unit="short", desc="", text_mode="auto", thresholds=None):
    return {
        "type": "stat", "title": title, "description": desc, "datasource": PROM,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute",
                               "steps": thresholds or [{"color": "green", "value": None}]},
                "links": [],
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "area" if text_mode == "auto" else "none",
            "justifyMode": "auto", "textMode": text_mode, "orientation": "auto",
        },
        "targets": _targets(qs),
    }


def heatmap(title, expr, desc=""):
    return {
        "type": "heatmap", "title": title, "description": desc, "datasource": PROM,
        "fieldConfig": {"defaults": {"custom": {}}, "overrides": []},
        "options": {
            "calculate": False, "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5, "fill": "dark-orange"},
            "yAxis": {"axisPlacement": "left", "unit": "ms"},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": False},
            "legend": {"show": True},
        },
        "targets": [target(expr, "{{le}}", "A", fmt="heatmap")],
    }


def variable(name, label, query, all_value=".*"):
    return {
        "type": "query", "name": name, "label": label, "datasource": PROM,
        "query": query, "definition": query, "refresh": 2, "sort": 1,
        "includeAll": True, "multi": True, "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "hide": 0, "regex": "",
    }


def build():
    L = Layout()
    trace_links = [{"title": "Broadcast traces in this time range (Jaeger, Explore)",
                    "url": explore_traces_url("broadcast"), "targetBlank": False}]

    # ------------------------------------------------------------------ overview
    L.row("Overview")
    L.add(stat("Active Connections", [(f"sum(sockudo_connected{{{S}}})", "connections")],
               desc="Open WebSocket connections (seed: Active connections gauge)."), 4, 4)
    L.add(stat("Active Channels", [(f"sum(sockudo_active_channels{{{S}}})", "channels")]), 4, 4)
    L.add(stat("Messages sent/s", [(f"sum(rate(sockudo_ws_messages_sent_total{{{S}}}[{RI}]))", "sent")], unit="ops"), 4, 4)
    L.add(stat("Messages received/s", [(f"sum(rate(sockudo_ws_messages_received_total{{{S}}}[{RI}]))", "received")], unit="ops"), 4, 4)
    L.add(stat("Version", [(f"count by (version) (sockudo_build_info{{{I}}})", "{{version}}")],
               desc="sockudo_build_info: number of instances per running version.", text_mode="name"), 4, 4)
    L.add(stat("Firing sockudo alerts",
               [(f'count(ALERTS{{alertstate="firing", alertname=~"Sockudo.+", {I}}}) or vector(0)', "alerts")],
               thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]), 4, 4)

    # ------------------------------------------------------------------ connections
    L.row("Connections")
    L.add(timeseries("Active Connections", [(f"sum by (instance) (sockudo_connected{{{S}}})", "{{instance}}")]), 8, 8)
    L.add(timeseries("Connections by app", [(f"sum by (app_id) (sockudo_connected{{{S}}})", "{{app_id}}")],
                     desc="Seed: `sockudo_connected by (app_id)` (invalid) corrected to `sum by (app_id) (...)`."), 8, 8)
    L.add(timeseries("Connection rate", [
        (f"sum by (instance) (rate(sockudo_new_connections_total{{{S}}}[{RI}]))", "{{instance}} connects"),
        (f"sum by (instance) (rate(sockudo_new_disconnections_total{{{S}}}[{RI}]))", "{{instance}} disconnects"),
    ], unit="ops"), 8, 8)
    L.add(timeseries("Connection errors by error_type", [
        (f"sum by (error_type) (rate(sockudo_connection_errors_total{{{S}}}[{RI}]))", "{{error_type}}"),
    ], unit="ops", stack=True, desc="Refused connections and fatal protocol errors (slow_consumer, pong_timeout, over_quota, ...)."), 24, 8)

    # ------------------------------------------------------------------ throughput
    L.row("Message throughput")
    L.add(timeseries("Message Rate", [
        (f"sum(rate(sockudo_ws_messages_sent_total{{{S}}}[{RI}]))", "Sent"),
        (f"sum(rate(sockudo_ws_messages_received_total{{{S}}}[{RI}]))", "Received"),
    ], unit="ops"), 12, 8)
    L.add(timeseries("WebSocket bytes", [
        (f"sum(rate(sockudo_socket_transmitted_bytes{{{S}}}[{RI}]))", "Transmitted"),
        (f"sum(rate(sockudo_socket_received_bytes{{{S}}}[{RI}]))", "Received"),
    ], unit="Bps"), 12, 8)

    # ------------------------------------------------------------------ HTTP API
    L.row("HTTP API")
    L.add(timeseries("HTTP API calls", [
        (f"sum by (app_id) (rate(sockudo_http_calls_received_total{{{S}}}[{RI}]))", "{{app_id}} API calls"),
    ], unit="reqps", desc="API request rate (the seed's 'API Response Time' panel charted this; the latency is in the next panels)."), 12, 8)
    L.add(timeseries("HTTP API bytes", [
        (f"sum(rate(sockudo_http_received_bytes{{{S}}}[{RI}]))", "Bytes In"),
        (f"sum(rate(sockudo_http_transmitted_bytes{{{S}}}[{RI}]))", "Bytes Out"),
    ], unit="Bps"), 12, 8)
    L.add(timeseries("API latency by route (p50 / p95 / p99)", [
        (f"histogram_quantile({q}, sum by (le, route) (rate(sockudo_http_server_request_duration_seconds_bucket{{{S}}}[{RI}])))",
         f"{{{{route}}}} p{int(q * 100)}") for q in (0.5, 0.95, 0.99)
    ], unit="s", desc="Request head received to response written, by matched route template (WebSocket upgrades excluded)."), 12, 8)
    L.add(timeseries("API requests by status class", [
        (f"sum by (status_class) (rate(sockudo_http_server_request_duration_seconds_count{{{S}}}[{RI}]))", "{{status_class}}"),
    ], unit="reqps", stack=True), 12, 8)

    # ------------------------------------------------------------------ channels
    L.row("Channels")
    L.add(timeseries("Active channels by channel_type", [
        (f"sum by (channel_type) (sockudo_active_channels{{{S}}})", "{{channel_type}}"),
    ], stack=True, desc="Seed: `sockudo_active_channels by (channel_type)` corrected to `sum by (channel_type) (...)`."), 8, 8)
    L.add(timeseries("Subscription rate", [
        (f"sum by (channel_type) (rate(sockudo_channel_subscriptions_total{{{S}}}[{RI}]))", "{{channel_type}}"),
    ], unit="ops"), 8, 8)
    L.add(timeseries("Unsubscription rate", [
        (f"sum by (channel_type) (rate(sockudo_channel_unsubscriptions_total{{{S}}}[{RI}]))", "{{channel_type}}"),
    ], unit="ops"), 8, 8)
    L.add(timeseries("Cache channel bytes by app", [
        (f"sum by (app_id) (sockudo_cache_channel_bytes{{{S}}})", "{{app_id}}"),
    ], unit="bytes", desc="Bytes held for cache channels' last events (frame plus channel name), bounded by `cache.max_mb_per_app` per app and `cache.max_mb` per node."), 12, 8)
    L.add(timeseries("Cache channel evictions by app", [
        (f"sum by (app_id) (rate(sockudo_cache_channel_evictions_total{{{S}}}[{RI}]))", "{{app_id}}"),
    ], unit="ops", desc="Last events evicted (the writing app's oldest, never another app's) or not stored to keep the cache within its byte bounds."), 12, 8)

    # ------------------------------------------------------------------ rate limiting
    L.row("Rate limiting")
    L.add(timeseries("Rate limit triggers", [
        (f"sum by (limiter_type, request_context) (rate(sockudo_rate_limit_triggered_total{{{S}}}[{RI}]))",
         "{{limiter_type}} / {{request_context}}"),
    ], unit="ops"), 12, 8)
    L.add(timeseries("Rate limit checks", [
        (f"sum by (limiter_type, request_context) (rate(sockudo_rate_limit_checks_total{{{S}}}[{RI}]))",
         "{{limiter_type}} / {{request_context}}"),
    ], unit="ops"), 12, 8)

    # ------------------------------------------------------------------ horizontal adapter
    L.row("Horizontal adapter")
    L.add(stat("Adapter connected", [(f"min by (instance, adapter) (sockudo_horizontal_adapter_connected{{{I}}})",
                                      "{{instance}} {{adapter}}")],
               thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
               desc="1 = connected to the adapter's broker (always 1 for local)."), 6, 8)
    L.add(timeseries("Adapter nodes seen", [
        (f"max by (instance, adapter) (sockudo_horizontal_adapter_nodes{{{I}}})", "{{instance}} {{adapter}}"),
    ]), 6, 8)
    L.add(timeseries("Horizontal adapter resolve time", [
        (f"histogram_quantile(0.95, sum by (le, instance) (rate(sockudo_horizontal_adapter_resolve_time_bucket{{{S}}}[{RI}])))",
         "{{instance}} p95"),
    ], unit="ms"), 12, 8)
    L.add(timeseries("Horizontal adapter operations", [
        (f"sum by (instance) (rate(sockudo_horizontal_adapter_sent_requests{{{S}}}[{RI}]))", "{{instance}} sent requests"),
        (f"sum by (instance) (rate(sockudo_horizontal_adapter_received_requests{{{S}}}[{RI}]))", "{{instance}} received requests"),
        (f"sum by (instance) (rate(sockudo_horizontal_adapter_received_responses{{{S}}}[{RI}]))", "{{instance}} received responses"),
    ], unit="ops"), 12, 8)
    L.add(timeseries("Cross-node queries: resolved vs timed out", [
        (f"sum by (instance) (rate(sockudo_horizontal_adapter_resolved_promises{{{S}}}[{RI}]))", "{{instance}} resolved"),
        (f"sum by (instance) (rate(sockudo_horizontal_adapter_uncomplete_promises{{{S}}}[{RI}]))", "{{instance}} timed out"),
    ], unit="ops"), 12, 8)
    L.add(timeseries("Cluster envelopes dropped", [
        (f"sum by (instance, direction, reason) (rate(sockudo_horizontal_adapter_dropped_total{{{I}}}[{RI}]))",
         "{{instance}} {{direction}} {{reason}}"),
    ], unit="ops", desc="Envelopes not sent or not processed. in/unauthenticated: unsigned, badly signed, "
                        "outside the 30 s replay window or naming another sender (forged, or a node with "
                        "another adapter.cluster_secret); in/decode: malformed; queue_full: a bounded queue "
                        "was full."), 12, 8)

    # ------------------------------------------------------------------ broadcast
    L.row("Broadcast performance")
    q = "sum by (le, recipient_count_bucket) (rate(sockudo_broadcast_latency_ms_bucket{%s}[%s]))" % (S, RI)
    L.add(timeseries("Broadcast latency by recipient count (p50 / p95 / p99)", [
        (f"histogram_quantile(0.50, {q})", "{{recipient_count_bucket}} (p50)"),
        (f"histogram_quantile(0.95, {q})", "{{recipient_count_bucket}} (p95)"),
        (f"histogram_quantile(0.99, {q})", "{{recipient_count_bucket}} (p99)"),
    ], unit="ms", links=trace_links,
        desc="From REST publish accepted to the frame written to the last local recipient. "
             "Links open the `broadcast` spans in Jaeger for the same time range."), 12, 9)
    L.add(timeseries("Average broadcast latency by channel type", [
        (f"sum by (channel_type) (rate(sockudo_broadcast_latency_ms_sum{{{S}}}[{RI}])) "
         f"/ sum by (channel_type) (rate(sockudo_broadcast_latency_ms_count{{{S}}}[{RI}]))", "{{channel_type}}"),
    ], unit="ms", links=trace_links), 12, 9)
    L.add(heatmap("Broadcast latency distribution",
                  f"sum by (le) (rate(sockudo_broadcast_latency_ms_bucket{{{S}}}[{RI}]))"), 12, 9)
    L.add(timeseries("Broadcast p95 by size category", [
        (f'histogram_quantile(0.95, sum by (le) (rate(sockudo_broadcast_latency_ms_bucket{{recipient_count_bucket="{b}", {S}}}[{RI}])))',
         f"{b} (p95)") for b in ("xs", "md", "xl")
    ], unit="ms", links=trace_links), 12, 9)

    # ------------------------------------------------------------------ webhooks / build
    L.row("Webhooks and build")
    L.add(timeseries("Webhooks by outcome", [
        (f"sum by (outcome) (rate(sockudo_webhooks_total{{{S}}}[{RI}]))", "{{outcome}}"),
    ], unit="ops", stack=True,
        links=[{"title": "Webhook traces (Jaeger, Explore)", "url": explore_traces_url("webhook.send"), "targetBlank": False}]), 12, 8)
    L.add(timeseries("Webhook queue by app", [
        (f"max by (app_id) (sockudo_webhook_queue_events{{{S}}})", "{{app_id}}"),
    ], desc="Webhook events waiting to be sent (queued, batching, in flight or waiting to retry), the largest node's view. "
            "On a Redis or NATS queue every node reports the shared queue (on NATS counted in requests of up to 100 events) "
            "plus what it has not written yet; on the memory queue each node reports its own, and a sum by app_id adds them up. "
            "An app is held to `webhooks.max_queue_events_per_app` and `max_queue_kb_per_app`, past which its new events are dropped."), 12, 8)
    L.add(stat("Build info", [(f"max by (instance, version) (sockudo_build_info{{{I}}})", "{{instance}}: {{version}}")],
               text_mode="name", desc="One tile per instance, named by the version it runs."), 12, 8)

    # ------------------------------------------------------------------ runtime
    L.row("Runtime, send queues and export")
    L.add(timeseries("Runtime utilisation", [
        (f"sum by (instance) (rate(sockudo_runtime_worker_busy_seconds_total{{{I}}}[{RI}])) "
         f"/ sum by (instance) (sockudo_runtime_workers{{{I}}})", "{{instance}}"),
    ], unit="percentunit", desc="Busy time of the async runtime's workers over their number: near 1, the node is saturated."), 6, 8)
    L.add(timeseries("Runtime tasks", [
        (f"sum by (instance) (sockudo_runtime_alive_tasks{{{I}}})", "{{instance}} alive"),
        (f"sum by (instance) (sockudo_runtime_global_queue_depth{{{I}}})", "{{instance}} waiting (global queue)"),
    ]), 6, 8)
    L.add(timeseries("Send queue bytes by app", [
        (f"sum by (app_id) (sockudo_socket_send_queue_bytes{{{S}}})", "{{app_id}}"),
    ], unit="bytes", desc="Bytes waiting in the app's sockets' send queues: slow consumers show here before they are closed (4100)."), 6, 8)
    L.add(timeseries("OTLP export failures", [
        (f"sum by (signal) (rate(sockudo_telemetry_export_failures_total{{{I}}}[{RI}]))", "{{signal}}"),
    ], unit="ops", desc="Export batches that failed; their data is dropped."), 6, 8)

    # ------------------------------------------------------------------ process
    L.row("Process")
    L.add(timeseries("Resident memory", [(f"process_resident_memory_bytes{{{P}}}", "{{instance}}")], unit="bytes"), 6, 8)
    L.add(timeseries("CPU", [(f"rate(process_cpu_seconds_total{{{P}}}[{RI}])", "{{instance}}")], unit="percentunit"), 6, 8)
    L.add(timeseries("File descriptors", [
        (f"process_open_fds{{{P}}}", "{{instance}} open"),
        (f"process_max_fds{{{P}}}", "{{instance}} limit"),
    ]), 6, 8)
    L.add(stat("Uptime", [(f"time() - process_start_time_seconds{{{P}}}", "{{instance}}")], unit="s"), 6, 8)

    # ------------------------------------------------------------------ recorded
    L.row("Recorded (5m windows, from recording rules)")
    L.add(timeseries("Worst-instance p95 broadcast latency by recipient count", [
        (f"max by (recipient_count_bucket) (sockudo:broadcast_latency_ms:p95{{{I}}})", "{{recipient_count_bucket}}"),
    ], unit="ms", links=trace_links), 8, 8)
    L.add(timeseries("Connections by app (recorded)", [
        (f"sum by (app_id) (instance_app_id:sockudo_connected:sum{{{S}}})", "{{app_id}}"),
    ]), 8, 8)
    L.add(timeseries("Message rates (recorded)", [
        (f"sum(instance_app_id:sockudo_ws_messages_sent:rate5m{{{S}}})", "Sent"),
        (f"sum(instance_app_id:sockudo_ws_messages_received:rate5m{{{S}}})", "Received"),
    ], unit="ops"), 8, 8)

    # ------------------------------------------------------------------ host
    L.row("Host (node_exporter)")
    L.add(timeseries("CPU usage", [
        (f'100 - (avg by (instance) (irate(node_cpu_seconds_total{{mode="idle", {N}}}[{RI}])) * 100)', "{{instance}}"),
    ], unit="percent"), 8, 8)
    L.add(timeseries("Memory usage", [
        (f"(1 - (node_memory_MemAvailable_bytes{{{N}}} / node_memory_MemTotal_bytes{{{N}}})) * 100", "{{instance}}"),
    ], unit="percent"), 8, 8)
    L.add(timeseries("Disk usage", [
        (f'(1 - (node_filesystem_avail_bytes{{fstype!~"tmpfs|overlay|squashfs", {N}}} '
         f'/ node_filesystem_size_bytes{{fstype!~"tmpfs|overlay|squashfs", {N}}})) * 100', "{{instance}} {{mountpoint}}"),
    ], unit="percent"), 8, 8)
    L.add(timeseries("Network I/O", [
        (f'rate(node_network_receive_bytes_total{{device!="lo", {N}}}[{RI}])', "{{instance}} {{device}} rx"),
        (f'rate(node_network_transmit_bytes_total{{device!="lo", {N}}}[{RI}])', "{{instance}} {{device}} tx"),
    ], unit="Bps"), 12, 8)
    L.add(timeseries("File descriptors (host)", [
        (f"node_filefd_allocated{{{N}}} / node_filefd_maximum{{{N}}} * 100", "{{instance}}"),
    ], unit="percent"), 12, 8)

    return {
        "uid": "sockudo-overview",
        "title": "Sockudo Overview",
        "description": "Sockudo metrics (contract: shared/reference/metrics.md). Generated by grafana/build_dashboard.py.",
        "tags": ["sockudo", "websocket"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "links": [{"title": "Traces (Jaeger)", "type": "link", "icon": "external link", "targetBlank": False,
                   "url": explore_traces_url("broadcast"), "tooltip": "Explore sockudo broadcast traces"}],
        "templating": {"list": [
            variable("instance", "Instance", "label_values(sockudo_build_info, instance)"),
            variable("app_id", "App", 'label_values(sockudo_connected{instance=~"$instance"}, app_id)'),
            variable("node", "Host", "label_values(node_uname_info, instance)"),
        ]},
        "panels": L.panels,
    }


def render():
    return json.dumps(build(), indent=2) + "\n"


def main(argv):
    text = render()
    if "--check" in argv:
        cur = open(OUT).read() if os.path.exists(OUT) else ""
        if cur != text:
            print(f"{OUT} is out of date: run python3 grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
