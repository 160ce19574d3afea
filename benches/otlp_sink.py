#!/usr/bin/env python3
"""A tiny OTLP/HTTP sink for benches/telemetry.sh: answers 200 (an empty protobuf
ExportTraceServiceResponse) to POST /v1/traces, /v1/metrics and /v1/logs, discarding the body,
and counts requests and bytes. Loopback only.

    python3 benches/otlp_sink.py PORT [STATS_FILE]

On SIGTERM or SIGINT it writes "requests=N bytes=M" to STATS_FILE (if given) and exits.
"""
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS = {"requests": 0, "bytes": 0}
LOCK = threading.Lock()


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        remaining = n
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
        if self.path.startswith("/v1/"):
            with LOCK:
                STATS["requests"] += 1
                STATS["bytes"] += n
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


def main():
    port = int(sys.argv[1])
    stats_file = sys.argv[2] if len(sys.argv) > 2 else None
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)
    server.daemon_threads = True

    def stop(*_):
        if stats_file:
            with LOCK, open(stats_file, "w") as f:
                f.write(f"requests={STATS['requests']} bytes={STATS['bytes']}\n")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
