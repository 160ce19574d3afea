#!/usr/bin/env python3
"""A stand-in /metrics endpoint that follows the telemetry contract (tests/ops/contract.py).

Serves every contract family with the contract's labels, counters growing with time and
histograms receiving observations, so live.sh can be exercised without the real server:

  python3 tests/ops/fake_exporter.py --port 0 --port-file /tmp/port   # binds 127.0.0.1 only
"""
import argparse
import http.server
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contract  # noqa: E402

APPS = ["app-1", "app-2"]
PORT_LABEL = "6001"
START = time.time()

# typical latency (ms) per recipient bucket: observations land in (lo, hi]
RCB_LATENCY = {"xs": (1, 2.5), "sm": (2.5, 5), "md": (10, 25), "lg": (50, 100), "xl": (250, 500)}


def labels(**kw):
    return "{" + ",".join(f'{k}="{v}"' for k, v in kw.items()) + "}"


def hist_lines(name, base, buckets, lo, hi, count):
    out = []
    for b in buckets:
        out.append(f'{name}_bucket{labels(**base, le=repr(float(b)))} {count if b >= hi else 0}')
    out.append(f'{name}_bucket{labels(**base, le="+Inf")} {count}')
    out.append(f"{name}_sum{labels(**base)} {count * (lo + hi) / 2}")
    out.append(f"{name}_count{labels(**base)} {count}")
    return out


def render():
    t = time.time() - START
    c = lambda per_s: round(per_s * t, 3)  # noqa: E731  counter value after t seconds
    L = []

    def family(name, typ, help_):
        L.append(f"# HELP {name} {help_}")
        L.append(f"# TYPE {name} {typ}")

    M = contract.METRICS
    for name, (typ, lbls) in M.items():
        family(name, typ, "fake " + name)
        if name.startswith("process_"):
            val = {"process_resident_memory_bytes": 52_000_000, "process_cpu_seconds_total": c(0.05),
                   "process_open_fds": 42, "process_max_fds": 1048576,
                   "process_start_time_seconds": round(START, 3)}[name]
            L.append(f"{name} {val}")
            continue
        if name == "sockudo_build_info":
            L.append(f'{name}{labels(port=PORT_LABEL, version="0.0.0-fake")} 1')
            continue
        if name in ("sockudo_horizontal_adapter_connected", "sockudo_horizontal_adapter_nodes"):
            L.append(f'{name}{labels(port=PORT_LABEL, adapter="redis")} {1 if name.endswith("connected") else 3}')
            continue
        if name == "sockudo_horizontal_adapter_dropped_total":
            for direction, reason in contract.DROP_KINDS:
                L.append(f'{name}{labels(port=PORT_LABEL, adapter="redis", direction=direction, reason=reason)} {c(0.1)}')
            continue
        if name == "sockudo_telemetry_export_failures_total":
            for signal in contract.EXPORT_SIGNALS:
                L.append(f'{name}{labels(port=PORT_LABEL, signal=signal)} {c(0.1)}')
            continue
        if name.startswith("sockudo_runtime_"):
            # Two workers busy 1.9 s per second: saturated, so the saturation alert has data.
            val = {"sockudo_runtime_workers": 2, "sockudo_runtime_alive_tasks": 512,
                   "sockudo_runtime_global_queue_depth": 3,
                   "sockudo_runtime_worker_busy_seconds_total": c(1.9)}[name]
            L.append(f"{name}{labels(port=PORT_LABEL)} {val}")
            continue
        for app in APPS:
            base = {"app_id": app, "port": PORT_LABEL}
            if name == "sockudo_broadcast_latency_ms":
                for ct in contract.CHANNEL_TYPES:
                    for rcb in contract.RECIPIENT_COUNT_BUCKETS:
                        lo, hi = RCB_LATENCY[rcb]
                        L += hist_lines(name, dict(base, channel_type=ct, recipient_count_bucket=rcb),
                                        contract.BROADCAST_BUCKETS, lo, hi, int(c(2)))
            elif name == "sockudo_http_server_request_duration_seconds":
                # A fast route and a slow one (p99 above the alert's 1 s).
                for route, (lo, hi) in (("/apps/{app_id}/events", (0.001, 0.0025)),
                                        ("/apps/{app_id}/batch_events", (1, 2.5))):
                    L += hist_lines(name, dict(base, method="POST", route=route, status_class="2xx"),
                                    contract.HTTP_DURATION_BUCKETS, lo, hi, int(c(5)))
            elif name == "sockudo_horizontal_adapter_resolve_time":
                L += hist_lines(name, base, contract.ADAPTER_RESOLVE_BUCKETS, 2.5, 5, int(c(3)))
            elif "channel_type" in lbls:
                for ct in contract.CHANNEL_TYPES:
                    L.append(f"{name}{labels(**base, channel_type=ct)} {c(1) if typ == 'counter' else 7}")
            elif "error_type" in lbls:
                for et in contract.ERROR_TYPES:
                    L.append(f"{name}{labels(**base, error_type=et)} {c(0.2)}")
            elif "limiter_type" in lbls:
                for lt, rc in zip(contract.LIMITER_TYPES, contract.REQUEST_CONTEXTS):
                    L.append(f"{name}{labels(**base, limiter_type=lt, request_context=rc)} {c(2)}")
            elif "outcome" in lbls:
                for o in contract.WEBHOOK_OUTCOMES:
                    L.append(f"{name}{labels(**base, outcome=o)} {c(0.5)}")
            elif typ == "gauge":
                L.append(f"{name}{labels(**base)} 123")
            else:
                L.append(f"{name}{labels(**base)} {c(10)}")
    return "\n".join(L) + "\n"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/metrics":
            self.send_response(404)
            self.end_headers()
            return
        body = render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--seconds", type=float, default=300, help="stop by itself after this long")
    a = ap.parse_args()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(srv.server_address[1]))
        os.replace(a.port_file + ".tmp", a.port_file)
    threading.Timer(a.seconds, srv.shutdown).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
