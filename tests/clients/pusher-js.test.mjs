// pusher-js v8 (Node build) + the official `pusher` Node server SDK against sockudo.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  TEST_TIMEOUT, uniq, waitFor, record, withTimeout, serverSdk, connectPusher, subscribe,
  sdkChannelAuthorization, RawClient, decodeData, clearCloseTimerAfter,
} from './helpers.mjs';

const opts = { timeout: TEST_TIMEOUT };

test('pusher-js connects and gets a socket_id', opts, async (t) => {
  const client = await connectPusher(t);
  assert.equal(client.connection.state, 'connected');
  assert.match(client.connection.socket_id, /^\d+\.\d+$/);
});

test('public channel: subscribe, then SDK trigger reaches the subscriber', opts, async (t) => {
  const sdk = serverSdk();
  const client = await connectPusher(t);
  const name = uniq('public-');
  const [channel] = await subscribe(client, name);
  assert.equal(channel.subscribed, true);

  const payload = { order: 42, text: 'héllo "quoted" \u2603', nested: { list: [1, 2, 3] } };
  const got = waitFor(channel, 'order-placed');
  const res = await sdk.trigger(name, 'order-placed', payload);
  assert.equal(res.status, 200);
  assert.deepEqual(await got, payload);
});

test('trigger with socket_id excludes that socket only', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('public-excl-');
  const a = await connectPusher(t);
  const b = await connectPusher(t);
  const [chA] = await subscribe(a, name);
  const [chB] = await subscribe(b, name);
  const seenByA = record(chA, 'ev-excluded');

  const bGotExcluded = waitFor(chB, 'ev-excluded');
  const aGotMarker = waitFor(chA, 'ev-marker');
  const bGotMarker = waitFor(chB, 'ev-marker');
  await sdk.trigger(name, 'ev-excluded', { n: 1 }, { socket_id: a.connection.socket_id });
  await sdk.trigger(name, 'ev-marker', { n: 2 });

  assert.deepEqual(await bGotExcluded, { n: 1 });
  assert.deepEqual(await bGotMarker, { n: 2 });
  assert.deepEqual(await aGotMarker, { n: 2 });
  // The marker was triggered after the excluded event, so had the server sent
  // the excluded event to A it would have arrived before the marker.
  assert.equal(seenByA.length, 0, 'the socket named in socket_id must not receive the event');
});

test('trigger to several channels at once', opts, async (t) => {
  const sdk = serverSdk();
  const client = await connectPusher(t);
  const names = [uniq('multi-a-'), uniq('multi-b-'), uniq('multi-c-')];
  const channels = [];
  for (const n of names) channels.push((await subscribe(client, n))[0]);
  const waits = channels.map((c) => waitFor(c, 'fanout'));
  await sdk.trigger(names, 'fanout', { hello: 'all' });
  for (const w of waits) assert.deepEqual(await w, { hello: 'all' });
});

test('triggerBatch delivers each event to its channel', opts, async (t) => {
  const sdk = serverSdk();
  const client = await connectPusher(t);
  const n1 = uniq('batch-1-');
  const n2 = uniq('batch-2-');
  const [c1] = await subscribe(client, n1);
  const [c2] = await subscribe(client, n2);
  const w1 = waitFor(c1, 'batch-ev-1');
  const w2 = waitFor(c2, 'batch-ev-2');
  const res = await sdk.triggerBatch([
    { channel: n1, name: 'batch-ev-1', data: { i: 1 } },
    { channel: n2, name: 'batch-ev-2', data: JSON.stringify({ i: 2 }) },
  ]);
  assert.equal(res.status, 200);
  assert.deepEqual(await w1, { i: 1 });
  assert.deepEqual(await w2, { i: 2 });
});

test('private channel: subscription authorized by the server SDK succeeds', opts, async (t) => {
  const sdk = serverSdk();
  const client = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk) });
  const name = uniq('private-');
  const [channel] = await subscribe(client, name);
  const got = waitFor(channel, 'secret-ev');
  await sdk.trigger(name, 'secret-ev', { ok: true });
  assert.deepEqual(await got, { ok: true });
});

test('private channel: bad signature -> pusher:subscription_error, connection stays up', opts, async (t) => {
  const good = serverSdk();
  const bad = serverSdk({ secret: 'definitely-not-the-secret' });
  const client = await connectPusher(t, {
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, cb) => {
        const sdk = channelName.startsWith('private-bad-') ? bad : good;
        cb(null, sdk.authorizeChannel(socketId, channelName));
      },
    },
  });
  const socketId = client.connection.socket_id;
  const states = record(client.connection, 'state_change');

  const badName = uniq('private-bad-');
  const badChannel = client.subscribe(badName);
  const succeeded = record(badChannel, 'pusher:subscription_succeeded');
  const err = await waitFor(badChannel, 'pusher:subscription_error', { label: `pusher:subscription_error on ${badName}` });
  assert.ok(err !== undefined);
  assert.equal(badChannel.subscribed, false);

  // A good subscription afterwards still works on the very same connection.
  await subscribe(client, uniq('private-good-'));
  assert.equal(client.connection.state, 'connected');
  assert.equal(client.connection.socket_id, socketId, 'the connection must not have been dropped/reconnected');
  assert.deepEqual(states, [], 'no connection state change expected');
  assert.equal(succeeded.length, 0);
});

test('presence channel: subscription_succeeded carries the members', opts, async (t) => {
  const sdk = serverSdk();
  const me = { user_id: uniq('alice-'), user_info: { name: 'Alice', role: 'admin' } };
  const client = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, me) });
  const name = uniq('presence-');
  const [channel, members] = await subscribe(client, name);
  assert.equal(members.count, 1);
  assert.deepEqual(members.me, { id: me.user_id, info: me.user_info });
  const listed = [];
  members.each((m) => listed.push(m));
  assert.deepEqual(listed, [{ id: me.user_id, info: me.user_info }]);
  assert.equal(channel.members.myID, me.user_id);
});

test('presence channel: member_added / member_removed, one member per user_id', opts, async (t) => {
  const sdk = serverSdk();
  const alice = { user_id: uniq('alice-'), user_info: { name: 'Alice' } };
  const bob = { user_id: uniq('bob-'), user_info: { name: 'Bob', n: 2 } };
  const name = uniq('presence-members-');

  const a = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, alice) });
  const [chA] = await subscribe(a, name);
  const added = record(chA, 'pusher:member_added');
  const removed = record(chA, 'pusher:member_removed');

  // First socket of bob joins: alice sees member_added with bob's id/info.
  const b1 = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, bob) });
  const bobAdded = waitFor(chA, 'pusher:member_added');
  const [, b1Members] = await subscribe(b1, name);
  assert.deepEqual(await bobAdded, { id: bob.user_id, info: bob.user_info });
  assert.equal(b1Members.count, 2);
  assert.deepEqual(b1Members.get(alice.user_id), { id: alice.user_id, info: alice.user_info });
  assert.deepEqual(b1Members.me, { id: bob.user_id, info: bob.user_info });

  // Second socket of the same user: no second member_added, still 2 members.
  const b2 = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, bob) });
  const [, b2Members] = await subscribe(b2, name);
  assert.equal(b2Members.count, 2, 'same user_id on two sockets is one member');
  let marker = waitFor(chA, 'marker-1');
  await sdk.trigger(name, 'marker-1', {});
  await marker;
  assert.equal(added.length, 1, `member_added must be sent once per user, got ${JSON.stringify(added)}`);

  // bob's first socket leaves: bob is still present through b2, no member_removed.
  b1.unsubscribe(name);
  await subscribe(b1, uniq('barrier-')); // the server has processed the unsubscribe once this succeeds
  marker = waitFor(chA, 'marker-2');
  await sdk.trigger(name, 'marker-2', {});
  await marker;
  assert.equal(removed.length, 0, `member_removed must wait for the user's last socket, got ${JSON.stringify(removed)}`);
  assert.equal(chA.members.count, 2);

  // bob's last socket goes away: member_removed.
  const bobRemoved = waitFor(chA, 'pusher:member_removed');
  b2.disconnect();
  assert.deepEqual(await bobRemoved, { id: bob.user_id, info: bob.user_info });
  assert.equal(chA.members.count, 1);
});

test('client events on a private channel reach the others, not the sender', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('private-client-ev-');
  const a = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk) });
  const b = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk) });
  const [chA] = await subscribe(a, name);
  const [chB] = await subscribe(b, name);
  const echoedToSender = record(chA, 'client-typing');

  const got = waitFor(chB, 'client-typing', { all: true });
  assert.equal(chA.trigger('client-typing', { who: 'a', typing: true }), true);
  const [data] = await got;
  assert.deepEqual(data, { who: 'a', typing: true });

  const marker = waitFor(chA, 'marker');
  await sdk.trigger(name, 'marker', {});
  await marker;
  assert.equal(echoedToSender.length, 0, 'the sender must not receive its own client event');
});

test('client events on a presence channel carry the sender user_id', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('presence-client-ev-');
  const alice = { user_id: uniq('alice-'), user_info: { name: 'Alice' } };
  const bob = { user_id: uniq('bob-'), user_info: { name: 'Bob' } };
  const a = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, alice) });
  const b = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk, bob) });
  const [chA] = await subscribe(a, name);
  const [chB] = await subscribe(b, name);
  const echoedToSender = record(chA, 'client-wave');

  const got = waitFor(chB, 'client-wave', { all: true });
  chA.trigger('client-wave', { from: 'alice' });
  const [data, metadata] = await got;
  assert.deepEqual(data, { from: 'alice' });
  assert.equal(metadata?.user_id, alice.user_id, 'presence client events must carry user_id');

  const marker = waitFor(chA, 'marker');
  await sdk.trigger(name, 'marker', {});
  await marker;
  assert.equal(echoedToSender.length, 0, 'the sender must not receive its own client event');
});

test('encrypted channel: SDK-encrypted trigger is decrypted by pusher-js', opts, async (t) => {
  const sdk = serverSdk({ encryptionMasterKeyBase64: randomBytes(32).toString('base64') });
  const name = uniq('private-encrypted-');
  const client = await connectPusher(t, { channelAuthorization: sdkChannelAuthorization(sdk) });
  const [channel] = await subscribe(client, name);

  // A raw observer sees only ciphertext: the server relays the payload untouched.
  const raw = await RawClient.connect(t);
  await raw.subscribe(name, sdk.authorizeChannel(raw.socketId, name));

  const payload = { card: '4111-1111', amount: 12.5 };
  const got = waitFor(channel, 'payment');
  await sdk.trigger(name, 'payment', payload);
  assert.deepEqual(await got, payload);

  const frame = await raw.next((m) => m.event === 'payment' && m.channel === name, { label: 'payment on raw socket' });
  const body = decodeData(frame.data);
  assert.equal(typeof body.ciphertext, 'string');
  assert.equal(typeof body.nonce, 'string');
  assert.ok(!JSON.stringify(frame).includes('4111-1111'), 'plaintext must not be visible on the wire');
});

test('cache channel: cache_miss first, then a new subscriber gets the last event', opts, async (t) => {
  const sdk = serverSdk();
  const name = uniq('cache-');

  const a = await connectPusher(t);
  const chA = a.subscribe(name);
  const orderA = [];
  chA.bind_global((ev) => { if (ev !== 'pusher:subscription_count') orderA.push(ev); });
  const miss = waitFor(chA, 'pusher:cache_miss', { label: `pusher:cache_miss on ${name}` });
  await waitFor(chA, 'pusher:subscription_succeeded');
  await miss;
  assert.deepEqual(orderA, ['pusher:subscription_succeeded', 'pusher:cache_miss']);

  const payload = { price: 99, currency: 'EUR' };
  const liveA = waitFor(chA, 'price-update');
  await sdk.trigger(name, 'price-update', payload);
  assert.deepEqual(await liveA, payload);

  const b = await connectPusher(t);
  const chB = b.subscribe(name);
  const orderB = [];
  chB.bind_global((ev) => { if (ev !== 'pusher:subscription_count') orderB.push(ev); });
  const cached = waitFor(chB, 'price-update', { label: 'cached price-update on the new subscriber' });
  await waitFor(chB, 'pusher:subscription_succeeded');
  assert.deepEqual(await cached, payload);
  assert.deepEqual(orderB, ['pusher:subscription_succeeded', 'price-update'],
    'the new subscriber gets subscription_succeeded then the cached event, and no cache_miss');
});

test('user sign-in, sendToUser, and terminateUserConnections', opts, async (t) => {
  const sdk = serverSdk();
  const userId = uniq('user-');
  const otherId = uniq('other-');
  const userAuthFor = (id) => ({
    customHandler: ({ socketId }, cb) => cb(null, sdk.authenticateUser(socketId, { id, user_info: { name: id } })),
  });

  const client = await connectPusher(t, { userAuthentication: userAuthFor(userId) });
  const bystander = await connectPusher(t, { userAuthentication: userAuthFor(otherId) });
  const signErrors = record(client.user, 'pusher:signin_error');
  client.signin();
  bystander.signin();
  await withTimeout(client.user.signinDonePromise, 'pusher.user sign-in');
  await withTimeout(bystander.user.signinDonePromise, 'bystander sign-in');
  assert.deepEqual(signErrors, []);
  assert.equal(client.user.user_data?.id, userId, 'pusher:signin_success must carry the user_data');

  const stu = client.user.serverToUserChannel;
  assert.equal(stu?.name, `#server-to-user-${userId}`);
  if (!stu.subscribed) await waitFor(stu, 'pusher:subscription_succeeded', { label: `subscription_succeeded(${stu.name})` });
  const bstu = bystander.user.serverToUserChannel;
  if (!bstu.subscribed) await waitFor(bstu, 'pusher:subscription_succeeded', { label: `subscription_succeeded(${bstu.name})` });

  const got = waitFor(client.user, 'direct-message');
  const res = await sdk.sendToUser(userId, 'direct-message', { text: 'hi there' });
  assert.equal(res.status, 200);
  assert.deepEqual(await got, { text: 'hi there' });

  // Terminate only that user's connections.
  const bystanderSocket = bystander.connection.socket_id;
  const leftConnected = waitFor(client.connection, 'state_change', {
    filter: ({ previous, current }) => previous === 'connected' && current !== 'connected',
    label: 'state change away from connected after terminate_connections',
  });
  clearCloseTimerAfter(t, client);
  const term = await sdk.terminateUserConnections(userId);
  assert.equal(term.status, 200);
  await leftConnected;

  await subscribe(bystander, uniq('barrier-'));
  assert.equal(bystander.connection.state, 'connected');
  assert.equal(bystander.connection.socket_id, bystanderSocket, 'other users must not be terminated');
});

test('subscription_count is pushed to subscribers', opts, async (t) => {
  const name = uniq('count-');
  const a = await connectPusher(t);
  const b = await connectPusher(t);
  const [chA] = await subscribe(a, name);
  const two = waitFor(chA, 'pusher:subscription_count', {
    filter: (d) => d?.subscription_count === 2,
    label: 'pusher:subscription_count == 2',
  });
  await subscribe(b, name);
  assert.deepEqual(await two, { subscription_count: 2 });
  assert.equal(chA.subscriptionCount, 2);

  const one = waitFor(chA, 'pusher:subscription_count', {
    filter: (d) => d?.subscription_count === 1,
    label: 'pusher:subscription_count == 1 after the second client left',
  });
  b.unsubscribe(name);
  assert.deepEqual(await one, { subscription_count: 1 });
});
