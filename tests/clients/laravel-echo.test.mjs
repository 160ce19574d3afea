// Laravel Echo (pusher broadcaster, running on pusher-js in Node) against sockudo.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Echo from 'laravel-echo';
import {
  APP_KEY, HOST, PORT, TEST_TIMEOUT, Pusher, uniq, waitFor, withTimeout, serverSdk,
} from './helpers.mjs';

const opts = { timeout: TEST_TIMEOUT };

/**
 * An Echo instance whose channel authorizer signs with the server SDK (what a
 * Laravel app's /broadcasting/auth would return). Resolves once connected.
 */
async function connectEcho(t, sdk, presenceUser) {
  const echo = new Echo({
    broadcaster: 'pusher',
    key: APP_KEY,
    wsHost: HOST,
    wsPort: PORT,
    forceTLS: false,
    enabledTransports: ['ws'],
    enableStats: false,
    cluster: 'mt1',
    Pusher,
    authorizer: (channel) => ({
      authorize: (socketId, callback) => {
        try {
          const data = channel.name.startsWith('presence-') ? presenceUser : undefined;
          callback(null, sdk.authorizeChannel(socketId, channel.name, data));
        } catch (err) {
          callback(err, null);
        }
      },
    }),
  });
  t.after(() => echo.disconnect());
  const conn = echo.connector.pusher.connection;
  if (conn.state !== 'connected') {
    await waitFor(conn, 'state_change', {
      filter: ({ current }) => {
        if (current === 'failed' || current === 'unavailable') throw new Error(`Echo connection went to '${current}'`);
        return current === 'connected';
      },
      label: 'Echo connected',
    });
  }
  return echo;
}

/** Resolves when an Echo channel's subscription succeeded (rejects on error). */
function subscribed(channel, label) {
  return withTimeout(new Promise((resolve, reject) => {
    if (channel.subscription?.subscribed) resolve();
    channel.subscribed(resolve);
    channel.error((err) => reject(new Error(`${label}: subscription error ${JSON.stringify(err)}`)));
  }), `${label} subscribed`);
}

test('Echo: socketId() and public channel listen(".OrderShipped")', opts, async (t) => {
  const sdk = serverSdk();
  const echo = await connectEcho(t, sdk);
  assert.match(echo.socketId(), /^\d+\.\d+$/);
  assert.equal(echo.connectionStatus(), 'connected');

  const name = uniq('orders.');
  const channel = echo.channel(name);
  const got = withTimeout(new Promise((resolve) => channel.listen('.OrderShipped', resolve)), '.OrderShipped');
  await subscribed(channel, name);
  await sdk.trigger(name, 'OrderShipped', { order: { id: 7, total: 19.99 } });
  assert.deepEqual(await got, { order: { id: 7, total: 19.99 } });
});

test('Echo: namespaced listen("OrderShipped") receives App\\Events\\OrderShipped', opts, async (t) => {
  const sdk = serverSdk();
  const echo = await connectEcho(t, sdk);
  const name = uniq('orders.');
  const channel = echo.channel(name);
  const got = withTimeout(new Promise((resolve) => channel.listen('OrderShipped', resolve)), 'App\\Events\\OrderShipped');
  await subscribed(channel, name);
  await sdk.trigger(name, 'App\\Events\\OrderShipped', { id: 8 });
  assert.deepEqual(await got, { id: 8 });
});

test('Echo: private channel with a custom authorizer', opts, async (t) => {
  const sdk = serverSdk();
  const echo = await connectEcho(t, sdk);
  const name = uniq('user.');
  const channel = echo.private(name);
  const got = withTimeout(new Promise((resolve) => channel.listen('.InvoicePaid', resolve)), '.InvoicePaid');
  await subscribed(channel, `private-${name}`);
  await sdk.trigger(`private-${name}`, 'InvoicePaid', { invoice: 'INV-1' });
  assert.deepEqual(await got, { invoice: 'INV-1' });
});

test('Echo: join() presence with here / joining / leaving', opts, async (t) => {
  const sdk = serverSdk();
  const room = uniq('chat.');
  const alice = { user_id: uniq('alice-'), user_info: { id: 'alice', name: 'Alice' } };
  const bob = { user_id: uniq('bob-'), user_info: { id: 'bob', name: 'Bob' } };

  const e1 = await connectEcho(t, sdk, alice);
  const p1 = e1.join(room);
  const here1 = withTimeout(new Promise((resolve) => p1.here(resolve)), 'here() for alice');
  const joining = withTimeout(new Promise((resolve) => p1.joining(resolve)), 'joining()');
  const leaving = withTimeout(new Promise((resolve) => p1.leaving(resolve)), 'leaving()', 10000);
  assert.deepEqual(await here1, [alice.user_info]);

  const e2 = await connectEcho(t, sdk, bob);
  const p2 = e2.join(room);
  const here2 = withTimeout(new Promise((resolve) => p2.here(resolve)), 'here() for bob');
  const users = await here2;
  assert.equal(users.length, 2);
  assert.deepEqual(
    users.map((u) => u.id).sort(),
    ['alice', 'bob'],
  );
  assert.deepEqual(await joining, bob.user_info);

  e2.leave(room);
  assert.deepEqual(await leaving, bob.user_info);
});

test('Echo: whisper() reaches another Echo client (client events)', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('doc.');
  const e1 = await connectEcho(t, sdk);
  const e2 = await connectEcho(t, sdk);
  assert.notEqual(e1.socketId(), e2.socketId());
  const c1 = e1.private(name);
  const c2 = e2.private(name);
  const s1 = subscribed(c1, 'e1 private');
  const s2 = subscribed(c2, 'e2 private');
  await s1;
  await s2;
  const got = withTimeout(new Promise((resolve) => c2.listenForWhisper('typing', resolve)), 'whisper typing');
  c1.whisper('typing', { user: 'alice', typing: true });
  assert.deepEqual(await got, { user: 'alice', typing: true });
});

test('Echo: whisper on a presence channel', opts, async (t) => {
  const sdk = serverSdk();
  const room = uniq('room.');
  const alice = { user_id: uniq('alice-'), user_info: { name: 'Alice' } };
  const bob = { user_id: uniq('bob-'), user_info: { name: 'Bob' } };
  const e1 = await connectEcho(t, sdk, alice);
  const e2 = await connectEcho(t, sdk, bob);
  const p1 = e1.join(room);
  const p2 = e2.join(room);
  const s1 = subscribed(p1, 'alice presence');
  const s2 = subscribed(p2, 'bob presence');
  await s1;
  await s2;
  const got = withTimeout(new Promise((resolve) => p1.listenForWhisper('reaction', resolve)), 'presence whisper');
  p2.whisper('reaction', { emoji: ':+1:' });
  assert.deepEqual(await got, { emoji: ':+1:' });
});
