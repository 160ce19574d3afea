// Watchlist events through pusher-js's own `pusher.user.watchlist` API, run by
// tests/it/watchlist.rs (not a *.test.mjs: it needs the ports it is given).
//
//   SOCKUDO_PORT   the node the watcher connects to
//   WATCHED_PORT   the node the watched users connect to (the same node, or another of the cluster)
//   GRACE_MS       the servers' watchlist_offline_grace_ms
//   KILL_PID       when set, the watched node's process: it is SIGKILLed and its users must go
//                  offline (within the node timeout) instead of disconnecting one by one
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  APP_KEY, HOST, PORT, Pusher, clientOptions, serverSdk, uniq, waitFor, withTimeout,
} from './helpers.mjs';

const WATCHED_PORT = Number(process.env.WATCHED_PORT || PORT);
const GRACE_MS = Number(process.env.GRACE_MS || 500);
const KILL_PID = process.env.KILL_PID ? Number(process.env.KILL_PID) : null;
const sdk = serverSdk();

/** A pusher-js client on `port`, signed in as `id` watching `watchlist`. */
async function signedIn(t, port, id, watchlist = []) {
  const client = new Pusher(APP_KEY, clientOptions({
    wsHost: HOST,
    wsPort: port,
    userAuthentication: {
      customHandler: ({ socketId }, cb) => cb(null, sdk.authenticateUser(socketId, { id, watchlist })),
    },
  }));
  t.after(() => client.disconnect());
  const events = [];
  for (const name of ['online', 'offline']) {
    client.user.watchlist.bind(name, (e) => events.push({ name, user_ids: e.user_ids }));
  }
  client.signin();
  await withTimeout(client.user.signinDonePromise, `sign-in of ${id}`);
  return { client, events };
}

/** Resolves with the first watchlist event `name` naming `user` (recorded already, or to come). */
function watchEvent(watcher, name, user, timeout) {
  const had = watcher.events.find((e) => e.name === name && e.user_ids.includes(user));
  if (had) return Promise.resolve(had);
  return waitFor(watcher.client.user.watchlist, name, {
    timeout,
    filter: (e) => e.user_ids.includes(user),
    label: `watchlist ${name} for ${user}`,
  });
}

test('pusher-js user.watchlist: online, offline, no flap on a reconnect within the grace', { timeout: 60000 }, async (t) => {
  const [early, late] = [uniq('early-'), uniq('late-')];
  const earlyUser = await signedIn(t, WATCHED_PORT, early);

  // Signing in tells the watcher who of its watchlist is online already (the event may come
  // before signinDonePromise settles, so it is read from the recorded events).
  const watcher = await signedIn(t, PORT, uniq('watcher-'), [early, late]);
  await watchEvent(watcher, 'online', early, 10000);
  assert.deepEqual(watcher.events, [{ name: 'online', user_ids: [early] }], 'one online event for the users already online');

  // A watched user's first socket anywhere makes it online.
  const wentOnline = watchEvent(watcher, 'online', late, 10000);
  const lateUser = await signedIn(t, WATCHED_PORT, late);
  assert.deepEqual((await wentOnline).user_ids, [late]);

  if (KILL_PID) {
    // The watched users' node dies: both go offline once its node timeout expires it.
    const gone = [watchEvent(watcher, 'offline', early, 20000), watchEvent(watcher, 'offline', late, 20000)];
    process.kill(KILL_PID, 'SIGKILL');
    await Promise.all(gone);
  } else {
    // A reconnect within the grace (to the watcher's node: another node in a cluster) is not seen.
    earlyUser.client.disconnect();
    await signedIn(t, PORT, early);
    // The end of the last socket is offline, after the grace.
    const started = Date.now();
    const lateOffline = watchEvent(watcher, 'offline', late, GRACE_MS + 10000);
    lateUser.client.disconnect();
    await lateOffline;
    assert.ok(Date.now() - started >= GRACE_MS * 0.9, `offline came after the grace (${Date.now() - started} ms)`);
    // By now the reconnected user's grace has run out too: it never flapped.
    const flaps = watcher.events.filter((e) => e.user_ids.includes(early) && e.name === 'offline');
    assert.deepEqual(flaps, [], 'no offline for a user who reconnected within the grace');
  }
  const onlines = watcher.events.filter((e) => e.name === 'online').map((e) => e.user_ids);
  assert.deepEqual(onlines, [[early], [late]], 'each user came online once');
});
