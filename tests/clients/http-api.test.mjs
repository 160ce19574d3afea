// HTTP API queries through the official `pusher` Node server SDK (signed requests).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  TEST_TIMEOUT, uniq, serverSdk, connectPusher, subscribe, sdkChannelAuthorization,
} from './helpers.mjs';

const opts = { timeout: TEST_TIMEOUT };

async function getJson(sdk, path, params) {
  const res = await sdk.get({ path, params });
  assert.equal(res.status, 200);
  return res.json();
}

test('HTTP API: presence users, user_count and subscription_count', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('presence-api-');
  const alice = { user_id: uniq('alice-'), user_info: { name: 'Alice' } };
  const bob = { user_id: uniq('bob-'), user_info: { name: 'Bob' } };
  const a = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, alice) });
  const b1 = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, bob) });
  const b2 = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, bob) });
  await subscribe(a, name);
  await subscribe(b1, name);
  await subscribe(b2, name);

  const users = await getJson(sdk, `/channels/${name}/users`);
  assert.deepEqual(
    users.users.map((u) => u.id).sort(),
    [alice.user_id, bob.user_id].sort(),
    `GET /channels/${name}/users lists each user once: ${JSON.stringify(users)}`,
  );

  const list = await getJson(sdk, '/channels', { filter_by_prefix: 'presence-', info: 'user_count' });
  assert.deepEqual(list.channels?.[name], { user_count: 2 }, `GET /channels?filter_by_prefix=presence-&info=user_count: ${JSON.stringify(list)}`);
  for (const ch of Object.keys(list.channels)) assert.ok(ch.startsWith('presence-'), `filter_by_prefix leaked ${ch}`);

  const info = await getJson(sdk, `/channels/${name}`, { info: 'user_count,subscription_count' });
  assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 });
});

test('HTTP API: public channel info and the channel list', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('public-api-');
  const a = await connectPusher(t);
  const b = await connectPusher(t);
  await subscribe(a, name);
  await subscribe(b, name);

  const info = await getJson(sdk, `/channels/${name}`, { info: 'subscription_count' });
  assert.deepEqual(info, { occupied: true, subscription_count: 2 });

  const all = await getJson(sdk, '/channels');
  assert.deepEqual(all.channels?.[name], {}, `GET /channels lists occupied channels: ${JSON.stringify(all)}`);

  const filtered = await getJson(sdk, '/channels', { filter_by_prefix: 'public-api-' });
  assert.ok(name in filtered.channels);
  for (const ch of Object.keys(filtered.channels)) assert.ok(ch.startsWith('public-api-'));

  const empty = await getJson(sdk, `/channels/${uniq('never-used-')}`);
  assert.equal(empty.occupied, false);
});

test('HTTP API: a request signed with the wrong secret is rejected with 401', opts, async () => {
  const bad = serverSdk({ secret: 'wrong-secret' });
  await assert.rejects(
    bad.trigger(uniq('public-'), 'ev', { x: 1 }),
    (err) => {
      assert.equal(err.status, 401, `expected HTTP 401, got ${err.status} ${err.body}`);
      return true;
    },
  );
  await assert.rejects(bad.get({ path: '/channels' }), (err) => err.status === 401);
});

test('HTTP API: unknown app id is rejected', opts, async () => {
  const sdk = serverSdk({ appId: 'no-such-app' });
  await assert.rejects(sdk.get({ path: '/channels' }), (err) => err.status >= 400 && err.status < 500);
});
