// pusher-js (forceTLS) and the `pusher` Node SDK (useTLS) against sockudo's TLS listener, with
// the test's private CA trusted through NODE_EXTRA_CA_CERTS, as a user of a private CA would.
// Not a *.test.mjs file: tests/it/tls_clients.rs runs it against a TLS server on its own:
//   NODE_EXTRA_CA_CERTS=ca.pem SOCKUDO_HOST=localhost SOCKUDO_PORT=... node --test tls-clients.mjs
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  HOST, PORT, TEST_TIMEOUT, WAIT_MS, WebSocket, connectPusher, sdkChannelAuthorization,
  serverSdk, subscribe, uniq, waitFor,
} from './helpers.mjs';

assert.ok(process.env.NODE_EXTRA_CA_CERTS, 'NODE_EXTRA_CA_CERTS names the test CA');

const tlsOptions = { forceTLS: true, wssPort: PORT, wsPort: PORT };

test('pusher-js with forceTLS receives over wss:// what the SDK triggers over https://', { timeout: TEST_TIMEOUT }, async (t) => {
  const sdk = serverSdk({ useTLS: true });
  const client = await connectPusher(t, { ...tlsOptions, channelAuthorization: sdkChannelAuthorization(sdk) });
  assert.equal(client.connection.state, 'connected');
  // The port speaks only TLS (see the next test), so being connected means wss://.
  assert.equal(client.config.useTLS, true);
  const name = uniq('private-tls-');
  const [channel] = await subscribe(client, name);
  const got = waitFor(channel, 'tls-event');
  await sdk.trigger(name, 'tls-event', { over: 'tls' });
  assert.deepEqual(await got, { over: 'tls' });
  const res = await sdk.get({ path: `/channels/${name}`, params: { info: 'subscription_count' } });
  assert.equal(res.status, 200);
  assert.equal((await res.json()).subscription_count, 1);
});

test('the SDK over https:// is refused with a bad signature as on plain HTTP', { timeout: TEST_TIMEOUT }, async () => {
  const sdk = serverSdk({ useTLS: true, secret: 'not-the-secret' });
  await assert.rejects(sdk.trigger('tls-bad-sig', 'e', {}), (err) => err.status === 401);
});

test('a plain ws:// client of the TLS port gets HTTP 400, not a hang', { timeout: TEST_TIMEOUT }, async () => {
  const ws = new WebSocket(`ws://${HOST}:${PORT}/app/app-key?protocol=7`);
  const status = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no answer within the bound')), WAIT_MS);
    ws.on('unexpected-response', (_req, res) => { clearTimeout(timer); resolve(res.statusCode); });
    ws.on('open', () => { clearTimeout(timer); reject(new Error('a plain client connected to a TLS port')); });
    ws.on('error', () => {});
  });
  assert.equal(status, 400);
  ws.terminate();
});
