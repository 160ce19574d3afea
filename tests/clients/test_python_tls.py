#!/usr/bin/env python3
"""Python's `pusher` SDK with ssl=True against sockudo's TLS listener and a private CA.

The SDK pins requests' `verify` to the certificate bundle it ships, so a server behind a
private CA needs a backend that trusts that CA instead (the README shows the same lines).
Deliveries are observed with a `websockets` client over wss:// trusting the CA.
Run by tests/it/tls_clients.rs with SOCKUDO_HOST=localhost, SOCKUDO_PORT and SOCKUDO_CA.
"""
import json
import os
import secrets
import ssl
import time
import unittest

import pusher
import requests
from pusher.requests import RequestsBackend
from websockets.sync.client import connect as ws_connect

HOST = os.environ.get("SOCKUDO_HOST", "localhost")
PORT = int(os.environ["SOCKUDO_PORT"])
CA = os.environ["SOCKUDO_CA"]
APP_ID = os.environ.get("SOCKUDO_PY_APP_ID", "12345")
APP_KEY = os.environ.get("SOCKUDO_PY_APP_KEY", "py-key")
APP_SECRET = os.environ.get("SOCKUDO_PY_APP_SECRET", "py-secret")
WAIT = 5.0


class PrivateCaBackend(RequestsBackend):
    """requests, trusting the private CA instead of the SDK's bundled roots."""

    def __init__(self, client, **options):
        super().__init__(client, **options)
        self.options["verify"] = CA


def sdk(backend=PrivateCaBackend):
    return pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET, host=HOST, port=PORT,
                         ssl=True, timeout=WAIT, backend=backend)


def wss():
    context = ssl.create_default_context(cafile=CA)
    url = "wss://%s:%d/app/%s?protocol=7&client=python-test&version=1.0" % (HOST, PORT, APP_KEY)
    return ws_connect(url, ssl=context, open_timeout=WAIT, close_timeout=1)


def next_frame(ws, pred, label):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            frame = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            break
        if pred(frame):
            return frame
    raise AssertionError("timed out waiting for %s" % label)


class PythonTlsTest(unittest.TestCase):
    def test_trigger_over_https_reaches_a_wss_subscriber(self):
        channel = "py-tls-%s" % secrets.token_hex(5)
        with wss() as ws:
            next_frame(ws, lambda f: f.get("event") == "pusher:connection_established", "established")
            ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}))
            next_frame(ws, lambda f: f.get("event") == "pusher_internal:subscription_succeeded",
                       "subscription_succeeded")
            self.assertIsInstance(sdk().trigger(channel, "py-tls", {"over": "tls"}), dict)
            frame = next_frame(ws, lambda f: f.get("event") == "py-tls", "py-tls")
            self.assertEqual(json.loads(frame["data"]), {"over": "tls"})
            info = sdk().channel_info(channel, ["subscription_count"])
            self.assertEqual(info["subscription_count"], 1)

    def test_the_sdks_own_roots_do_not_trust_a_private_ca(self):
        # Proves the backend above is what makes the other test pass.
        with self.assertRaises(requests.exceptions.SSLError):
            sdk(backend=RequestsBackend).trigger("py-tls-untrusted", "e", {})


if __name__ == "__main__":
    unittest.main(verbosity=2)
