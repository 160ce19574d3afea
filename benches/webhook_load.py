#!/usr/bin/env python3
"""Webhook load for benches/webhooks.sh (Python 3.11, stdlib only, loopback only).

    python3 benches/webhook_load.py sink --port P --secret S [--stats-file F] [--stall-at N --stall-ms M]
    python3 benches/webhook_load.py produce --port P --sink-port Q --rate R --duration T ...
    python3 benches/webhook_load.py nats-delete --port 4222 STREAM...

sink: an HTTP receiver that answers every POST with 200 (empty body) at once, then checks
the X-Pusher-Signature (HMAC-SHA256 of the body with the app secret), reads the Pusher body
`{"time_ms": ..., "events": [...]}` and, for each `client_event` whose data is `SEQ:NANOS`,
records the delay from NANOS (CLOCK_MONOTONIC of the producer, the same clock system-wide) to
the moment the request's body was in. GET /stats gives the counts, GET /report everything.
With --stall-at N it holds its answer to the Nth request for --stall-ms (a receiver's pause).

produce: opens --sockets WebSocket connections to the server (`/app/KEY?protocol=7`), each
subscribes to its own private channel (auth: HMAC-SHA256 of `socket_id:channel` with the
secret), then sends --rate client events per second in all for --duration seconds on a fixed
schedule (every 2 ms whatever is due, round-robin over the sockets), the data of each being
`SEQ:NANOS` taken just before its write. Then it waits until the sink has every event or
--drain seconds have passed (with --metrics-port, the events the server counted as dropped
are not waited for), and prints one JSON object: what was sent, the sink's report
(with the events received at most --grace seconds after the last write: on time; the others
are late),
the CPU seconds of the server (--server-pid), of the broker (--broker-pid), of itself and of
the sink (--sink-pid), and of the rest of the machine ("other load"), over the sending window
and the drain.

nats-delete: deletes JetStream streams by name over the NATS protocol (the bench's own).
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- CPU accounting -------------------------------------------------------------------------
def proc_cpu(pid):
    """utime + stime of a process in seconds, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_busy():
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return (total - idle) / CLK_TCK


class CpuMeter:
    def __init__(self, pids):
        self.pids = {k: p for k, p in pids.items() if p}
        self.t0 = time.monotonic()
        self.m0 = machine_busy()
        self.p0 = {k: proc_cpu(p) for k, p in self.pids.items()}

    def stop(self):
        wall = time.monotonic() - self.t0
        busy = machine_busy() - self.m0
        out = {"wall_seconds": wall, "machine_busy_seconds": busy, "cores": os.cpu_count()}
        ours = 0.0
        for k, p in self.pids.items():
            a, b = self.p0[k], proc_cpu(p)
            used = None if a is None or b is None else b - a
            out[f"{k}_cpu_seconds"] = used
            ours += used or 0.0
        out["other_cpu_seconds"] = max(0.0, busy - ours)
        return out


def wait_quiet(below, max_wait, pids):
    """Waits (2 s windows) until processes other than `pids` use less than `below` percent of
    the machine, at most `max_wait` seconds; returns the seconds waited."""
    start = time.monotonic()
    said = False
    while True:
        m = CpuMeter(pids)
        time.sleep(2)
        r = m.stop()
        share = 100.0 * r["other_cpu_seconds"] / (r["cores"] * r["wall_seconds"])
        if share < below:
            return time.monotonic() - start
        if time.monotonic() - start >= max_wait:
            print(f"[quiet] other processes still use {share:.0f}% of the machine; going on", file=sys.stderr)
            return time.monotonic() - start
        if not said:
            print(f"[quiet] other processes use {share:.0f}%; waiting up to {max_wait:.0f}s for <{below:.0f}%",
                  file=sys.stderr)
            said = True


# --- sink -----------------------------------------------------------------------------------
class State:
    def __init__(self, secret):
        self.secret = secret.encode()
        self.lock = threading.Lock()
        self.requests = 0
        self.bad_signatures = 0
        self.bad_bodies = 0
        self.request_ids = set()
        self.duplicate_requests = 0
        self.events = 0
        self.other_events = 0
        self.seen = set()
        self.duplicates = 0
        self.delays_ns = []
        self.batch_sizes = []
        self.first_send = None
        self.last_recv = None
        self.first_recv = None
        self.recv_per_second = {}
        self.recv_ns = []

    def stats(self):
        with self.lock:
            return {"requests": self.requests, "events": self.events, "unique": len(self.seen),
                    "duplicates": self.duplicates}

    def report(self, until=None):
        """Everything; with `until` (monotonic ns) also the events received by then."""
        with self.lock:
            d = sorted(self.delays_ns)
            sizes = sorted(self.batch_sizes)

            def pct(arr, q):
                if not arr:
                    return None
                return arr[min(len(arr) - 1, max(0, int(q * len(arr) + 0.5) - 1))]

            ms = lambda x: None if x is None else x / 1e6  # noqa: E731
            span = None
            if self.first_send is not None and self.last_recv is not None:
                span = (self.last_recv - self.first_send) / 1e9
            unique = len(self.seen)
            on_time = None if until is None else sum(1 for t in self.recv_ns if t <= until)
            return {
                "on_time_until_ns": until,
                "on_time_events": on_time,
                "requests": self.requests,
                "duplicate_requests": self.duplicate_requests,
                "bad_signatures": self.bad_signatures,
                "bad_bodies": self.bad_bodies,
                "events": self.events,
                "unique_events": unique,
                "duplicate_events": self.duplicates,
                "other_events": self.other_events,
                "first_send_to_last_receipt_seconds": span,
                "delivered_per_second": (unique / span) if span else None,
                "events_per_request": {"mean": (self.events / self.requests) if self.requests else None,
                                       "p50": pct(sizes, 0.5), "max": sizes[-1] if sizes else None},
                "delay_ms": {"p50": ms(pct(d, 0.5)), "p90": ms(pct(d, 0.9)), "p99": ms(pct(d, 0.99)),
                             "max": ms(d[-1] if d else None), "min": ms(d[0] if d else None),
                             "mean": ms(sum(d) / len(d)) if d else None},
                "received_per_second": [self.recv_per_second[k] for k in sorted(self.recv_per_second)],
            }

    def take(self, body, signature, request_id, recv_ns):
        ok_sig = hmac.compare_digest(hmac.new(self.secret, body, hashlib.sha256).hexdigest(), signature or "")
        try:
            events = json.loads(body)["events"]
        except (ValueError, KeyError, TypeError):
            events = None
        with self.lock:
            self.requests += 1
            if not ok_sig:
                self.bad_signatures += 1
            if request_id in self.request_ids:
                self.duplicate_requests += 1
            self.request_ids.add(request_id)
            if events is None:
                self.bad_bodies += 1
                return
            self.batch_sizes.append(len(events))
            if self.first_recv is None:
                self.first_recv = recv_ns
            self.last_recv = recv_ns if self.last_recv is None else max(self.last_recv, recv_ns)
            sec = (recv_ns - self.first_recv) // 1_000_000_000
            for e in events:
                data = e.get("data") if e.get("name") == "client_event" else None
                try:
                    seq, sent = data.split(":")
                    seq, sent = int(seq), int(sent)
                except (AttributeError, ValueError):
                    self.other_events += 1
                    continue
                self.events += 1
                if seq in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(seq)
                self.recv_per_second[sec] = self.recv_per_second.get(sec, 0) + 1
                self.delays_ns.append(recv_ns - sent)
                self.recv_ns.append(recv_ns)
                if self.first_send is None or sent < self.first_send:
                    self.first_send = sent


def sink(args):
    state = State(args.secret)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            recv_ns = time.monotonic_ns()
            if args.stall_at and state.requests + 1 == args.stall_at:
                time.sleep(args.stall_ms / 1000)  # a receiver hiccup, on request --stall-at
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.wfile.flush()
            state.take(body, self.headers.get("X-Pusher-Signature"), self.headers.get("X-Sockudo-Webhook-Id"), recv_ns)

        def do_GET(self):
            if self.path.startswith("/stats"):
                out = state.stats()
            elif self.path.startswith("/report"):
                q = self.path.partition("?until=")[2]
                out = state.report(int(q) if q.isdigit() else None)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            raw = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True

    def stop(*_):
        if args.stats_file:
            with open(args.stats_file, "w") as f:
                json.dump(state.report(), f)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.2)


# --- WebSocket producer -----------------------------------------------------------------------
def mask_frame(payload, opcode=1):
    """A masked client frame (FIN set) carrying `payload` (bytes)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    k = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")
    return head + key + masked


class Conn:
    def __init__(self, host, port, key, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.send_lock = threading.Lock()
        nonce = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /app/{key}?protocol=7&client=webhook-load&version=0.1 HTTP/1.1\r\n"
               f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed during the upgrade")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise RuntimeError(f"upgrade refused: {status.decode(errors='replace')}")
        expect = base64.b64encode(hashlib.sha1((nonce + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if expect not in head:
            raise RuntimeError("bad Sec-WebSocket-Accept")

    def frame(self):
        """The next complete frame in the buffer as (opcode, payload), or None."""
        b = self.buf
        if len(b) < 2:
            return None
        op, n = b[0] & 0x0F, b[1] & 0x7F
        off = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, off = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, off = struct.unpack("!Q", b[2:10])[0], 10
        if len(b) < off + n:
            return None
        self.buf = b[off + n:]
        return op, b[off:off + n]

    def read_frame(self):
        while True:
            f = self.frame()
            if f is not None:
                return f
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk

    def send(self, data):
        with self.send_lock:
            self.sock.sendall(data)

    def expect(self, event, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op, payload = self.read_frame()
            if op == 9:
                self.send(mask_frame(payload, 10))
                continue
            if op != 1:
                continue
            msg = json.loads(payload)
            if msg.get("event") == event:
                return msg
            if msg.get("event") in ("pusher:error", "pusher_internal:subscription_error"):
                raise RuntimeError(f"server said {payload[:200]!r}")
        raise RuntimeError(f"no {event} within {timeout}s")


def reader(conns, stop, counts):
    """Drains what the server sends during the run: answers pings, counts errors and closes."""
    sel = selectors.DefaultSelector()
    # The sockets stay blocking (the sender's sendall needs that): recv only after select.
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.2):
            c = key.data
            try:
                chunk = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if not chunk:
                counts["closed"] += 1
                sel.unregister(c.sock)
                continue
            c.buf += chunk
            while (f := c.frame()) is not None:
                op, payload = f
                if op == 9:
                    try:
                        c.send(mask_frame(payload, 10))
                    except OSError:
                        pass
                elif op == 8:
                    counts["closed"] += 1
                    counts["close_frames"].append(payload[2:120].decode(errors="replace"))
                elif op == 1 and b"pusher:error" in payload:
                    counts["errors"] += 1
                    if len(counts["error_samples"]) < 3:
                        counts["error_samples"].append(payload[:200].decode(errors="replace"))


def dropped(metrics_port):
    """The server's sockudo_webhooks_total{outcome="dropped"} (events), or 0."""
    if not metrics_port:
        return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0
    return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
               if line.startswith("sockudo_webhooks_total{") and 'outcome="dropped"' in line)


def get_json(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def produce(args):
    ours = {"server": args.server_pid, "broker": args.broker_pid, "sink": args.sink_pid, "producer": os.getpid()}
    waited = 0.0
    if args.quiet_below > 0:
        waited = wait_quiet(args.quiet_below, args.quiet_wait, ours)
    run = f"{os.getpid():x}{int(time.time()) % 100000:x}"
    conns, channels = [], []
    for i in range(args.sockets):
        c = Conn(args.host, args.port, args.key, args.timeout)
        est = c.expect("pusher:connection_established", args.timeout)
        socket_id = json.loads(est["data"])["socket_id"]
        ch = f"private-wh-{run}-{i}"
        sig = hmac.new(args.secret.encode(), f"{socket_id}:{ch}".encode(), hashlib.sha256).hexdigest()
        sub = {"event": "pusher:subscribe", "data": {"channel": ch, "auth": f"{args.key}:{sig}"}}
        c.send(mask_frame(json.dumps(sub).encode()))
        c.expect("pusher_internal:subscription_succeeded", args.timeout)
        conns.append(c)
        channels.append(ch)
    prefix = [f'{{"event":"client-wh","channel":"{ch}","data":"'.encode() for ch in channels]
    stop = threading.Event()
    counts = {"closed": 0, "errors": 0, "error_samples": [], "close_frames": []}
    for c in conns:
        c.sock.settimeout(None)
    rd = threading.Thread(target=reader, args=(conns, stop, counts), daemon=True)
    rd.start()
    total = int(args.rate * args.duration)
    tick = 0.002
    meter = CpuMeter(ours)
    start = time.monotonic()
    sent, max_lag, write_errors = 0, 0.0, 0
    n = len(conns)
    while sent < total:
        now = time.monotonic()
        due = min(total, int((now - start) * args.rate) + 1)
        if due > sent:
            out = [[] for _ in range(n)]
            ns = time.monotonic_ns()
            for seq in range(sent, due):
                i = seq % n
                out[i].append(mask_frame(prefix[i] + f'{seq}:{ns}"}}'.encode()))
            # The schedule's lag: how late the oldest event of this tick goes out.
            max_lag = max(max_lag, now - (start + sent / args.rate))
            for i, frames in enumerate(out):
                if frames:
                    try:
                        conns[i].send(b"".join(frames))
                    except OSError:
                        write_errors += len(frames)
            sent = due
        else:
            time.sleep(max(0.0, min(tick, start + sent / args.rate - now)))
    send_seconds = time.monotonic() - start
    last_send_ns = time.monotonic_ns()
    # Drain: until the sink has every event that the server did not drop (or --drain seconds).
    deadline = time.monotonic() + args.drain
    stats, gone, polls = get_json(args.sink_port, "/stats"), 0, 0
    while stats["unique"] + gone < sent and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = get_json(args.sink_port, "/stats")
        polls += 1
        if polls % 5 == 0:
            gone = dropped(args.metrics_port)
    drained = stats["unique"] + gone >= sent
    cpu = meter.stop()
    stop.set()
    rd.join(1)
    # On time: received at most --grace seconds after the last event was written.
    until = last_send_ns + int(args.grace * 1e9)
    while time.monotonic_ns() < until:
        time.sleep(0.05)
    report = get_json(args.sink_port, f"/report?until={until}")
    delivered = report["unique_events"]
    per_event = lambda k: (cpu[k] / delivered * 1e6) if delivered and cpu.get(k) is not None else None  # noqa: E731
    out = {
        "sockets": n,
        "offered_rate": args.rate,
        "duration_seconds": args.duration,
        "sent": sent,
        "send_seconds": send_seconds,
        "achieved_send_rate": sent / send_seconds if send_seconds else None,
        "max_schedule_lag_ms": max_lag * 1000,
        "write_errors": write_errors,
        "server_errors": counts["errors"],
        "server_error_samples": counts["error_samples"],
        "sockets_closed": counts["closed"],
        "close_reasons": counts["close_frames"][:3],
        "drained": drained,
        "drain_wait_seconds": time.monotonic() - (deadline - args.drain),
        "lost": sent - delivered,
        "grace_seconds": args.grace,
        "late": delivered - (report["on_time_events"] or 0),
        # Events delivered on time per second of sending: the offered rate when all are on time.
        "on_time_per_second": (report["on_time_events"] or 0) / send_seconds if send_seconds else None,
        "quiet_wait_seconds": waited,
        "sink": report,
        "cpu": cpu,
        "server_cpu_us_per_event": per_event("server_cpu_seconds"),
        "broker_cpu_us_per_event": per_event("broker_cpu_seconds"),
    }
    for c in conns:
        try:
            c.send(mask_frame(struct.pack("!H", 1000), 8))
            c.sock.close()
        except OSError:
            pass
    json.dump(out, sys.stdout)
    print()


# --- NATS: delete the bench's streams ------------------------------------------------------
def nats_delete(args):
    s = socket.create_connection(("127.0.0.1", args.port), timeout=5)
    f = s.makefile("rb")
    f.readline()  # INFO
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\nSUB _INBOX.whbench 1\r\n')
    done = []
    for name in args.streams:
        s.sendall(f"PUB $JS.API.STREAM.DELETE.{name} _INBOX.whbench 0\r\n\r\n".encode())
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("NATS closed the connection")
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG"):
                size = int(line.split()[-1])
                body = f.read(size + 2)[:size]
                done.append(f"{name}: {json.loads(body).get('success', False)}")
                break
            elif line.startswith(b"-ERR"):
                raise SystemExit(line.decode().strip())
    print(" ".join(done))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--secret", default="app-secret")
    s.add_argument("--stats-file")
    s.add_argument("--stall-at", type=int, default=0, help="hold the answer to this request (1-based)")
    s.add_argument("--stall-ms", type=float, default=0.0, help="for this long")
    q = sub.add_parser("produce")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--sink-port", type=int, required=True)
    q.add_argument("--key", default="app-key")
    q.add_argument("--secret", default="app-secret")
    q.add_argument("--sockets", type=int, default=4)
    q.add_argument("--rate", type=float, required=True, help="client events per second, in all")
    q.add_argument("--duration", type=float, required=True)
    q.add_argument("--drain", type=float, default=10.0)
    q.add_argument("--grace", type=float, default=1.0,
                   help="events received this long after the last write still count as on time")
    q.add_argument("--timeout", type=float, default=10.0)
    q.add_argument("--server-pid", type=int)
    q.add_argument("--metrics-port", type=int, help="the server's: the drain stops once the dropped are counted")
    q.add_argument("--broker-pid", type=int)
    q.add_argument("--sink-pid", type=int)
    q.add_argument("--quiet-below", type=float, default=0.0, help="percent of the machine")
    q.add_argument("--quiet-wait", type=float, default=60.0)
    n = sub.add_parser("nats-delete")
    n.add_argument("--port", type=int, default=4222)
    n.add_argument("streams", nargs="+")
    args = p.parse_args()
    {"sink": sink, "produce": produce, "nats-delete": nats_delete}[args.cmd](args)


if __name__ == "__main__":
    main()
