#!/usr/bin/env python3
"""The official Python server SDK (PyPI `pusher`) against sockudo.

Deliveries are observed with a raw Pusher-protocol-7 WebSocket client
(`websockets` sync API).  Run: python3 tests/clients/test_python_sdk.py
"""
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
import unittest

import pusher
from pusher.errors import PusherBadAuth
from websockets.sync.client import connect as ws_connect

HOST = os.environ.get("SOCKUDO_HOST", "127.0.0.1")
PORT = int(os.environ.get("SOCKUDO_PORT", "16001"))
APP_ID = os.environ.get("SOCKUDO_PY_APP_ID", "12345")
APP_KEY = os.environ.get("SOCKUDO_PY_APP_KEY", "py-key")
APP_SECRET = os.environ.get("SOCKUDO_PY_APP_SECRET", "py-secret")
WAIT = 5.0


def uniq(prefix):
    return "%s%x-%s" % (prefix, int(time.time() * 1000), secrets.token_hex(5))


def sdk(secret=APP_SECRET, app_id=APP_ID):
    return pusher.Pusher(app_id=app_id, key=APP_KEY, secret=secret,
                         host=HOST, port=PORT, ssl=False, timeout=WAIT)


def decode(data):
    if isinstance(data, str):
        try:
            return json.loads(data)
        except ValueError:
            return data
    return data


class RawClient:
    """Buffers frames so that next() never loses one that arrived early."""

    def __init__(self, key=APP_KEY):
        url = "ws://%s:%d/app/%s?protocol=7&client=python-test&version=1.0" % (HOST, PORT, key)
        self.ws = ws_connect(url, open_timeout=WAIT, close_timeout=1)
        self.buffer = []
        est = self.next(lambda m: m.get("event") == "pusher:connection_established",
                        "pusher:connection_established")
        self.socket_id = decode(est["data"])["socket_id"]

    def next(self, pred, label="frame", timeout=WAIT):
        for i, m in enumerate(self.buffer):
            if pred(m):
                return self.buffer.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %.1fs waiting for %s; unconsumed frames: %r"
                                     % (timeout, label, self.buffer))
            try:
                raw = self.ws.recv(timeout=left)
            except TimeoutError:
                continue
            m = json.loads(raw)
            if pred(m):
                return m
            self.buffer.append(m)

    def send(self, event, data, channel=None):
        frame = {"event": event, "data": data}
        if channel is not None:
            frame["channel"] = channel
        self.ws.send(json.dumps(frame))

    def subscribe(self, channel, auth=None):
        data = {"channel": channel}
        data.update(auth or {})
        self.send("pusher:subscribe", data)
        m = self.next(lambda m: m.get("channel") == channel and m.get("event") in (
            "pusher_internal:subscription_succeeded", "pusher:subscription_error", "pusher:error"),
            "subscription_succeeded(%s)" % channel)
        if m["event"] != "pusher_internal:subscription_succeeded":
            raise AssertionError("subscription to %s failed: %r" % (channel, m))
        return m

    def event(self, channel, name):
        return self.next(lambda m: m.get("channel") == channel and m.get("event") == name,
                         "%s on %s" % (name, channel))

    def close(self):
        self.ws.close()


class PythonSdkTest(unittest.TestCase):
    def setUp(self):
        self.client = sdk()

    def raw(self):
        c = RawClient()
        self.addCleanup(c.close)
        return c

    def test_trigger_reaches_subscriber(self):
        ch = uniq("py-public-")
        ws = self.raw()
        ws.subscribe(ch)
        payload = {"n": 1, "text": "h\u00e9llo"}
        res = self.client.trigger(ch, "py-event", payload)
        self.assertIsInstance(res, dict)
        ev = ws.event(ch, "py-event")
        self.assertEqual(decode(ev["data"]), payload)

    def test_trigger_several_channels(self):
        chs = [uniq("py-multi-a-"), uniq("py-multi-b-")]
        ws = self.raw()
        for ch in chs:
            ws.subscribe(ch)
        self.client.trigger(chs, "fanout", {"all": True})
        for ch in chs:
            self.assertEqual(decode(ws.event(ch, "fanout")["data"]), {"all": True})

    def test_trigger_socket_id_excludes_sender(self):
        ch = uniq("py-excl-")
        a, b = self.raw(), self.raw()
        a.subscribe(ch)
        b.subscribe(ch)
        self.client.trigger(ch, "excluded", {"n": 1}, socket_id=a.socket_id)
        self.client.trigger(ch, "marker", {"n": 2})
        self.assertEqual(decode(b.event(ch, "excluded")["data"]), {"n": 1})
        b.event(ch, "marker")
        a.event(ch, "marker")
        self.assertFalse([m for m in a.buffer if m.get("event") == "excluded"],
                         "the socket named in socket_id must not receive the event")

    def test_trigger_batch(self):
        c1, c2 = uniq("py-batch-1-"), uniq("py-batch-2-")
        ws = self.raw()
        ws.subscribe(c1)
        ws.subscribe(c2)
        res = self.client.trigger_batch([
            {"channel": c1, "name": "b1", "data": {"i": 1}},
            {"channel": c2, "name": "b2", "data": {"i": 2}},
        ])
        self.assertIsInstance(res, dict)
        self.assertEqual(decode(ws.event(c1, "b1")["data"]), {"i": 1})
        self.assertEqual(decode(ws.event(c2, "b2")["data"]), {"i": 2})

    def test_private_channel_with_sdk_auth(self):
        ch = uniq("private-py-")
        ws = self.raw()
        auth = self.client.authenticate(channel=ch, socket_id=ws.socket_id)
        ws.subscribe(ch, auth)
        self.client.trigger(ch, "private-ev", {"ok": 1})
        self.assertEqual(decode(ws.event(ch, "private-ev")["data"]), {"ok": 1})

    def test_presence_users_and_counts(self):
        ch = uniq("presence-py-")
        uid = uniq("py-user-")
        ws = self.raw()
        auth = self.client.authenticate(channel=ch, socket_id=ws.socket_id,
                                        custom_data={"user_id": uid, "user_info": {"name": "Py"}})
        # The SDK's signature is HMAC-SHA256(secret, "socket_id:channel:channel_data").
        expected_sig = hmac.new(APP_SECRET.encode(), ("%s:%s:%s" % (ws.socket_id, ch, auth["channel_data"])).encode(),
                                hashlib.sha256).hexdigest()
        self.assertEqual(auth["auth"], "%s:%s" % (APP_KEY, expected_sig))
        ok = ws.subscribe(ch, auth)
        presence = decode(ok["data"])["presence"]
        self.assertEqual(presence["count"], 1)
        self.assertEqual(presence["ids"], [uid])
        self.assertEqual(presence["hash"], {uid: {"name": "Py"}})

        self.assertEqual(self.client.users_info(ch), {"users": [{"id": uid}]})

        infos = self.client.channels_info(prefix_filter="presence-", attributes=["user_count"])
        self.assertEqual(infos["channels"].get(ch), {"user_count": 1}, infos)
        for name in infos["channels"]:
            self.assertTrue(name.startswith("presence-"), name)

        info = self.client.channel_info(ch, attributes=["user_count", "subscription_count"])
        self.assertEqual(info, {"occupied": True, "user_count": 1, "subscription_count": 1})

    def test_channel_info_public_and_unoccupied(self):
        ch = uniq("py-info-")
        ws = self.raw()
        ws.subscribe(ch)
        self.assertEqual(self.client.channel_info(ch, attributes=["subscription_count"]),
                         {"occupied": True, "subscription_count": 1})
        self.assertEqual(self.client.channel_info(uniq("py-unused-")).get("occupied"), False)

    def test_send_to_user(self):
        uid = uniq("py-signed-")
        ws = self.raw()
        ws.send("pusher:signin", self.client.authenticate_user(ws.socket_id, {"id": uid}))
        ok = ws.next(lambda m: m.get("event") in ("pusher:signin_success", "pusher:error"), "pusher:signin_success")
        self.assertEqual(ok["event"], "pusher:signin_success", ok)
        ws.subscribe("#server-to-user-%s" % uid)
        self.client.send_to_user(uid, "to-user", {"hi": "there"})
        ev = ws.event("#server-to-user-%s" % uid, "to-user")
        self.assertEqual(decode(ev["data"]), {"hi": "there"})

    def test_wrong_secret_raises_bad_auth(self):
        bad = sdk(secret="wrong-secret")
        with self.assertRaises(PusherBadAuth):
            bad.trigger(uniq("py-bad-"), "ev", {"x": 1})
        with self.assertRaises(PusherBadAuth):
            bad.channels_info()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    run, failed = result.testsRun, len(result.failures) + len(result.errors)
    skipped = len(result.skipped)
    print("%d passed, %d failed, %d skipped" % (run - failed - skipped, failed, skipped))
    sys.exit(0 if result.wasSuccessful() and run > 0 else 1)
