// Raw Pusher protocol 7 frames over the `ws` package: handshake, errors, ping,
// signin and terminate close codes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  TEST_TIMEOUT, uniq, serverSdk, RawClient, decodeData,
} from './helpers.mjs';

const opts = { timeout: TEST_TIMEOUT };

test('raw: connection_established carries socket_id and activity_timeout', opts, async (t) => {
  const c = new RawClient(RawClient.url());
  t.after(() => c.close());
  const est = await c.next((m) => m.event === 'pusher:connection_established', { label: 'pusher:connection_established' });
  assert.equal(c.frames[0], est, 'connection_established must be the first frame');
  const data = decodeData(est.data);
  assert.match(data.socket_id, /^\d+\.\d+$/);
  assert.equal(typeof data.activity_timeout, 'number');
  assert.ok(data.activity_timeout > 0);
});

test('raw: pusher:ping is answered with pusher:pong', opts, async (t) => {
  const c = await RawClient.connect(t);
  const pong = await c.ping();
  assert.equal(pong.event, 'pusher:pong');
});

test('raw: public subscribe -> pusher_internal:subscription_succeeded, then events', opts, async (t) => {
  const sdk = serverSdk();
  const c = await RawClient.connect(t);
  const name = uniq('raw-public-');
  const ok = await c.subscribe(name);
  assert.equal(ok.channel, name);
  await sdk.trigger(name, 'raw-ev', { a: 1 });
  const ev = await c.next((m) => m.event === 'raw-ev', { label: 'raw-ev' });
  assert.equal(ev.channel, name);
  assert.deepEqual(decodeData(ev.data), { a: 1 });
});

test('raw: unknown app key -> pusher:error 4001 then close 4001', opts, async (t) => {
  const c = new RawClient(RawClient.url({ key: 'nope', query: 'protocol=7' }));
  t.after(() => c.close());
  const closed = await c.waitClose();
  const errFrame = c.frames.find((m) => m.event === 'pusher:error');
  assert.ok(errFrame, `expected a pusher:error frame before the close, got ${JSON.stringify(c.frames)}`);
  assert.equal(typeof errFrame.data, 'object', 'pusher:error data is an object {code, message}');
  assert.equal(errFrame.data.code, 4001);
  assert.equal(typeof errFrame.data.message, 'string');
  assert.equal(c.frames.some((m) => m.event === 'pusher:connection_established'), false);
  assert.equal(closed.code, 4001);
});

test('raw: unsupported protocol version -> pusher:error 4007 then close 4007', opts, async (t) => {
  const c = new RawClient(RawClient.url({ query: 'protocol=3' }));
  t.after(() => c.close());
  const closed = await c.waitClose();
  const errFrame = c.frames.find((m) => m.event === 'pusher:error');
  assert.ok(errFrame, `expected a pusher:error frame before the close, got ${JSON.stringify(c.frames)}`);
  assert.equal(typeof errFrame.data, 'object', 'pusher:error data is an object {code, message}');
  assert.equal(errFrame.data.code, 4007);
  assert.equal(closed.code, 4007);
});

test('raw: private subscribe with a bad signature -> pusher:subscription_error, socket stays open', opts, async (t) => {
  const bad = serverSdk({ secret: 'wrong-secret' });
  const c = await RawClient.connect(t);
  const name = uniq('private-raw-bad-');
  c.send('pusher:subscribe', { channel: name, ...bad.authorizeChannel(c.socketId, name) });
  const err = await c.next((m) => m.event === 'pusher:subscription_error' || m.event === 'pusher:error'
    || m.event === 'pusher_internal:subscription_succeeded', { label: 'subscription error frame' });
  assert.equal(err.event, 'pusher:subscription_error', `got ${JSON.stringify(err)}`);
  assert.equal(err.channel, name);
  await c.ping();
  assert.equal(c.closed, null);
});

test('raw: signin, then terminate_connections closes with a 4xxx code', opts, async (t) => {
  const sdk = serverSdk();
  const userId = uniq('raw-user-');
  const victim = await RawClient.connect(t);
  const other = await RawClient.connect(t);
  victim.send('pusher:signin', sdk.authenticateUser(victim.socketId, { id: userId }));
  const ok = await victim.next((m) => m.event === 'pusher:signin_success' || m.event === 'pusher:error', { label: 'pusher:signin_success' });
  assert.equal(ok.event, 'pusher:signin_success', `got ${JSON.stringify(ok)}`);
  assert.equal(JSON.parse(decodeData(ok.data).user_data).id, userId);
  other.send('pusher:signin', sdk.authenticateUser(other.socketId, { id: uniq('raw-other-') }));
  await other.next((m) => m.event === 'pusher:signin_success', { label: 'other signin_success' });

  const res = await sdk.terminateUserConnections(userId);
  assert.equal(res.status, 200);
  const closed = await victim.waitClose();
  assert.ok(closed.code >= 4000 && closed.code <= 4999, `close code should be 4xxx, got ${closed.code}`);
  await other.ping();
  assert.equal(other.closed, null, 'other users stay connected');
});

test('raw: signin with a bad signature is rejected', opts, async (t) => {
  const bad = serverSdk({ secret: 'wrong-secret' });
  const c = await RawClient.connect(t);
  c.send('pusher:signin', bad.authenticateUser(c.socketId, { id: uniq('raw-bad-') }));
  const first = await c.next(
    (m) => m.event === 'pusher:signin_success' || m.event === 'pusher:error',
    { label: 'signin rejection' },
  ).catch((err) => {
    if (c.closed) return { closed: c.closed }; // closing the socket is an acceptable rejection too
    throw err;
  });
  assert.notEqual(first.event, 'pusher:signin_success', 'a bad user-auth signature must not sign in');
});
