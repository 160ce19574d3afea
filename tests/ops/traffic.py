#!/usr/bin/env python3
"""Real-client traffic against two sockudo nodes for tests/ops/live_server.sh.

  traffic.py --node1 127.0.0.1:P1 --node2 127.0.0.1:P2 --node2-pid PID [--duration 24] [--crowd 1050]

Clients are the ones users run: the official Python server SDK (`pusher`) for the HTTP API and
`websockets` speaking Pusher protocol 7 for the sockets (plus a few raw TCP sockets that stop
reading, to be slow consumers). What it drives, so that every metric family and the alerts have
something real to show:

* subscribers on both nodes on public, private, presence, private-encrypted and cache channels;
  publishes via the API on node 1 only, so node 2 delivers remote broadcasts (broadcast latency
  recorded on both nodes);
* a crowd of `--crowd` sockets on node 2 (default 1050: over the shipped 1000-connection alert),
  150 of them on one channel (`md` recipient bucket), 20 on another (`sm` bucket), closed at the
  end at once (a disconnection burst);
* a stall of node 2 (SIGSTOP for ~2 s, then SIGCONT): broadcasts published meanwhile reach node 2's
  `sm` channel late (high broadcast latency with real delays), node 1's cross-node queries time
  out (adapter resolve time, uncomplete promises);
* client events at 100/s from 3 sockets against a 1/s limit each, API publishes over the `ops-limited` app's 1/s
  budget, a burst of WebSocket connects from 127.0.0.3 over node 1's per-IP limit;
* an unknown app key (connection error `app_not_found`), a bad channel auth ("authentication
  failed"), connect/disconnect churn, channel/user queries on both nodes;
* slow consumers on node 1 (raw sockets with a tiny receive buffer that stop reading) fed large
  events until the server drops them (`slow_consumer`);
* one API publish carrying a W3C `traceparent` (its trace id is printed for the log check).

Prints one JSON object (`{"traffic": {...}}`) when the traffic is done, then keeps the base
sockets open with light traffic until SIGTERM or `--hold` seconds, so that Prometheus still sees a
live system while the expressions are evaluated.
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.request

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")

import pusher  # noqa: E402
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

# Numeric app ids: the Python SDK accepts nothing else. live_server.sh writes the same apps.
APP_ID, KEY, SECRET = "4242", "ops-key", "ops-secret"
LIMITED = ("4243", "ops-limited-key", "ops-limited-secret")
MASTER_KEY = base64.b64encode(b"ops-live-test-master-key-32bytes").decode()

STATS = {}


def bump(name, n=1):
    STATS[name] = STATS.get(name, 0) + n


def log(msg):
    print(f"[traffic {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ WebSocket clients
class Sock:
    """One Pusher-protocol socket; a background task drains (and counts) what it receives."""

    def __init__(self, addr, key=KEY, local_ip=None):
        self.addr, self.key, self.local_ip = addr, key, local_ip
        self.ws = None
        self.socket_id = None
        self.received = 0
        self.task = None
        self.waiters = []

    async def open(self, timeout=5):
        kwargs = {"local_addr": (self.local_ip, 0)} if self.local_ip else {}
        self.ws = await ws_connect(f"ws://{self.addr}/app/{self.key}?protocol=7&client=ops-live&version=1.0",
                                   open_timeout=timeout, close_timeout=1, ping_interval=None,
                                   proxy=None, compression=None, max_size=2 ** 21, **kwargs)
        first = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if first.get("event") != "pusher:connection_established":
            raise RuntimeError(f"refused: {first}")
        self.socket_id = json.loads(first["data"])["socket_id"]
        self.task = asyncio.create_task(self._drain())
        return self

    async def _drain(self):
        try:
            async for raw in self.ws:
                self.received += 1
                m = json.loads(raw)
                for w in list(self.waiters):
                    pred, fut = w
                    if not fut.done() and pred(m):
                        fut.set_result(m)
        except Exception:
            pass

    async def expect(self, pred, timeout=5):
        fut = asyncio.get_running_loop().create_future()
        w = (pred, fut)
        self.waiters.append(w)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters.remove(w)

    async def send(self, event, data, channel=None):
        frame = {"event": event, "data": data}
        if channel:
            frame["channel"] = channel
        await self.ws.send(json.dumps(frame))

    async def subscribe(self, sdk, channel, user=None, bad_auth=False, timeout=5):
        data = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            custom = {"user_id": user, "user_info": {"name": user}} if channel.startswith("presence-") else None
            auth = await asyncio.to_thread(sdk.authenticate, channel, self.socket_id, custom)
            data["auth"] = auth["auth"] if not bad_auth else auth["auth"][:-4] + "0000"
            if "channel_data" in auth:
                data["channel_data"] = auth["channel_data"]
        ok = lambda m: m.get("channel") == channel and m.get("event") in (  # noqa: E731
            "pusher_internal:subscription_succeeded", "pusher:subscription_error")
        waiting = asyncio.create_task(self.expect(ok, timeout))
        await asyncio.sleep(0)
        await self.send("pusher:subscribe", data)
        m = await waiting
        if bad_auth:
            return m["event"] == "pusher:subscription_error"
        if m["event"] != "pusher_internal:subscription_succeeded":
            raise RuntimeError(f"subscribe {channel}: {m}")
        bump("subscriptions")
        return True

    async def close(self):
        try:
            await self.ws.close()
        except Exception:
            pass
        if self.task:
            self.task.cancel()


async def refused(addr, key):
    """A connection with a key the server does not know: expect pusher:error 4001."""
    try:
        s = await Sock(addr, key=key).open()
        await s.close()
        return False
    except Exception as e:
        return "4001" in str(e)


# ------------------------------------------------------------------ slow consumers (raw TCP)
def ws_frame(payload: bytes) -> bytes:
    mask = secrets.token_bytes(4)
    n = len(payload)
    head = bytes([0x81])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def slow_consumer(addr, channel):
    """A real WebSocket client that subscribes, then never reads again (receive buffer 4 KiB)."""
    host, port = addr.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind(("127.0.0.2", 0))  # its own source address: not counted against node 1's per-IP limit
    s.settimeout(5)
    s.connect((host, int(port)))
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    s.sendall((f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    deadline = time.monotonic() + 5
    while b"connection_established" not in buf and time.monotonic() < deadline:
        buf += s.recv(4096)
    if b"101" not in buf.split(b"\r\n", 1)[0] or b"connection_established" not in buf:
        raise RuntimeError(f"slow consumer handshake: {buf[:200]!r}")
    s.sendall(ws_frame(json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}).encode()))
    buf = b""
    while b"subscription_succeeded" not in buf and time.monotonic() < deadline:
        buf += s.recv(4096)
    return s


# ------------------------------------------------------------------ HTTP API
def signed_publish(addr, channel, event, data, headers=None):
    """POST /apps/{id}/events signed by hand, to send extra headers (traceparent)."""
    body = json.dumps({"name": event, "channels": [channel], "data": json.dumps(data)}).encode()
    path = f"/apps/{APP_ID}/events"
    params = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
              "body_md5": hashlib.md5(body).hexdigest()}
    qs = "&".join(f"{k}={params[k]}" for k in sorted(params))
    sig = hmac.new(SECRET.encode(), f"POST\n{path}\n{qs}".encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(f"http://{addr}{path}?{qs}&auth_signature={sig}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as r:
        return r.status


def sdk_for(addr, app=(APP_ID, KEY, SECRET)):
    host, port = addr.rsplit(":", 1)
    return pusher.Pusher(app_id=app[0], key=app[1], secret=app[2], host=host, port=int(port), ssl=False,
                         timeout=5, encryption_master_key_base64=MASTER_KEY)


async def api(fn, *args, **kw):
    try:
        r = await asyncio.to_thread(fn, *args, **kw)
        bump("api_ok")
        return r
    except Exception as e:  # 429 from the limited app, or a query while node 2 is stopped
        bump("api_error:" + type(e).__name__)
        return None


# ------------------------------------------------------------------ scenario
async def run(a):
    n1, n2 = a.node1, a.node2
    sdk1, sdk2 = sdk_for(n1), sdk_for(n2)
    limited = sdk_for(n1, LIMITED)
    channels = ["ops-pub", "cache-ops", "private-ops", "presence-ops"]
    encrypted = "private-encrypted-ops"
    result = {}

    # --- base subscribers on both nodes
    base = []
    for addr, sdk, user in ((n1, sdk1, "u1"), (n2, sdk2, "u2"), (n2, sdk2, "u3")):
        s = await Sock(addr).open()
        for ch in channels + [encrypted]:
            await s.subscribe(sdk, ch, user=user)
        base.append(s)
    limiters = []                              # send client events far past their 1/s budget
    for _ in range(3):
        s = await Sock(n1).open()
        await s.subscribe(sdk1, "private-ops")
        limiters.append(s)
    log(f"base subscribers ready ({len(base)} sockets x {len(channels) + 1} channels)")

    # --- the crowd on node 2
    crowd = []
    sem = asyncio.Semaphore(48)

    async def join(i):
        async with sem:
            for attempt in range(3):
                try:
                    s = await Sock(n2).open(timeout=10)
                    break
                except Exception:
                    if attempt == 2:
                        bump("crowd_connect_failed")
                        return
                    await asyncio.sleep(0.2)
            if i < 150:
                await s.subscribe(sdk2, "ops-crowd")
            elif i < 170:
                await s.subscribe(sdk2, "ops-sm")
            crowd.append(s)

    t = time.monotonic()
    await asyncio.gather(*(join(i) for i in range(a.crowd)))
    result["crowd"] = len(crowd)
    log(f"crowd of {len(crowd)} sockets on node 2 in {time.monotonic() - t:.1f}s")

    slow = []
    slow_feed_done = asyncio.Event()

    async def slow_feed():
        try:
            for _ in range(8):
                slow.append(await asyncio.to_thread(slow_consumer, n1, "ops-slow"))
            blob = {"blob": "x" * (90 * 1024)}  # over the SDK's 10 KB check: signed by hand
            for _ in range(a.slow_events):
                await api(signed_publish, n1, "ops-slow", "big", blob)
            bump("slow_consumers", len(slow))
        except Exception as e:
            log(f"slow consumers: {e!r}")
            bump("slow_consumer_error")
        finally:
            slow_feed_done.set()

    async def connect_burst():
        ok = refusedn = 0
        socks = []
        for _ in range(a.burst):
            try:
                socks.append(await Sock(n1, local_ip="127.0.0.3").open(timeout=3))
                ok += 1
            except Exception:
                refusedn += 1
        for s in socks:
            await s.close()
        result["connect_burst"] = {"accepted": ok, "refused": refusedn}

    async def stall_node2():
        """SIGSTOP node 2 for ~2 s: late remote broadcasts, cross-node query timeouts."""
        log("stalling node 2 (SIGSTOP)")
        t0 = time.monotonic()
        os.kill(a.node2_pid, signal.SIGSTOP)
        try:
            for i in range(6):
                await api(sdk1.trigger, ["ops-sm"], "late", {"i": i})
            for _ in range(3):
                await api(sdk1.channels_info, None, ["subscription_count"])
            while time.monotonic() - t0 < a.stall:
                await asyncio.sleep(0.05)
        finally:
            os.kill(a.node2_pid, signal.SIGCONT)
        result["stall_seconds"] = round(time.monotonic() - t0, 2)
        log(f"node 2 resumed after {result['stall_seconds']}s")

    async def client_events(begin, end):
        """`--client-events` per second in all, round-robin over the limiter sockets; catches up
        when the loop fell behind, so the total (what rate()[5m] sees) does not depend on speed."""
        sent = 0
        while (now := time.monotonic()) < end:
            due = int(a.client_events * (now - begin)) - sent
            for k in range(min(max(due, 0), 60)):
                await limiters[(sent + k) % len(limiters)].send("client-tick", {"k": sent + k}, channel="private-ops")
            sent += min(max(due, 0), 60)
            await asyncio.sleep(0.02)
        bump("client_events", sent)

    # --- the timed loop
    tick, start, i = 0.2, time.monotonic(), 0
    stalled = burst = traced = closed = False
    tasks = [asyncio.create_task(slow_feed()), asyncio.create_task(client_events(start, start + a.duration))]
    while (now := time.monotonic() - start) < a.duration:
        i += 1
        await api(sdk1.trigger, channels, "tick", {"i": i, "t": time.time()})
        if i % 2 == 0:
            await api(sdk1.trigger, [encrypted], "tick", {"i": i})
        if i % 5 == 0:  # once a second
            await api(sdk1.trigger, ["ops-crowd"], "crowd", {"i": i})
            await api(sdk1.trigger, ["ops-sm"], "sm", {"i": i})
            q = sdk1 if i % 10 == 0 else sdk2
            await api(q.channels_info, None, ["subscription_count"])
            await api(q.channel_info, "presence-ops", ["user_count", "subscription_count"])
            await api(q.users_info, "presence-ops")
            for _ in range(3):  # 1/s budget: two of three refused (429)
                await api(limited.trigger, ["ops-pub"], "limited", {"i": i})
            bump("bad_key_refused" if await refused(n1 if i % 10 else n2, "no-such-key") else "bad_key_not_refused")
            churn = [await Sock(n).open() for n in (n1, n2)]
            await churn[0].subscribe(sdk1, "ops-pub")
            await churn[1].subscribe(sdk2, "private-ops")
            for s in churn:
                await s.close()
            bump("churn", 2)
        if i % 25 == 0:  # a failed channel auth every 5 s
            s = await Sock(n2).open()
            bump("bad_auth_rejected" if await s.subscribe(sdk2, "private-ops", bad_auth=True) else "bad_auth_accepted")
            await s.close()
        if not traced and now >= 2:
            traced = True
            trace_id = secrets.token_hex(16)
            status = await asyncio.to_thread(signed_publish, n1, "ops-pub", "traced", {"traced": True},
                                             {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
            result["trace_id"] = trace_id
            result["traced_status"] = status
        if not burst and now >= 4:
            burst = True
            tasks.append(asyncio.create_task(connect_burst()))
        if not stalled and now >= a.duration * 0.5:
            stalled = True
            await stall_node2()
        if not closed and now >= a.duration - a.close_before_end:
            closed = True
            log(f"closing the crowd ({len(crowd)} sockets)")
            await asyncio.gather(*(s.close() for s in crowd))
            bump("crowd_closed", len(crowd))
        await asyncio.sleep(max(0.0, tick - ((time.monotonic() - start) % tick)))
    try:
        await asyncio.wait_for(slow_feed_done.wait(), 20)
    except asyncio.TimeoutError:
        bump("slow_feed_timeout")
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in slow:
        s.close()
    result["received_frames"] = sum(s.received for s in base)
    result["stats"] = dict(sorted(STATS.items()))
    print(json.dumps({"traffic": result}), flush=True)

    # --- hold: a live system while the expressions are evaluated
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    hold_end = time.monotonic() + a.hold
    j = 0
    while not stop.is_set() and time.monotonic() < hold_end:
        j += 1
        await api(sdk1.trigger, channels, "hold", {"j": j})
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    for s in base + limiters:
        await s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node1", required=True, help="HOST:PORT of node 1 (API publishes go here)")
    ap.add_argument("--node2", required=True, help="HOST:PORT of node 2")
    ap.add_argument("--node2-pid", type=int, required=True, help="pid of node 2 (stalled with SIGSTOP/SIGCONT)")
    ap.add_argument("--duration", type=float, default=24)
    ap.add_argument("--crowd", type=int, default=1050)
    ap.add_argument("--stall", type=float, default=2.0)
    ap.add_argument("--burst", type=int, default=25)
    ap.add_argument("--slow-events", type=int, default=40)
    ap.add_argument("--client-events", type=float, default=100, help="client events per second (limit: 1/s per socket)")
    ap.add_argument("--close-before-end", type=float, default=3.0)
    ap.add_argument("--hold", type=float, default=120)
    a = ap.parse_args()
    for addr in (a.node1, a.node2):
        if not addr.startswith(("127.", "localhost:")):
            sys.exit(f"refusing non-loopback address {addr}")
    asyncio.run(run(a))


if __name__ == "__main__":
    main()
