// Shared helpers for the sockudo real-client conformance tests.
// Not a test file itself (node --test only picks up *.test.mjs here).
import { randomBytes } from 'node:crypto';
import Pusher from 'pusher-js';
import PusherServer from 'pusher';
import WebSocket from 'ws';

export const HOST = process.env.SOCKUDO_HOST || '127.0.0.1';
export const PORT = Number(process.env.SOCKUDO_PORT || 16001);
export const APP_ID = process.env.SOCKUDO_APP_ID || 'app-id';
export const APP_KEY = process.env.SOCKUDO_APP_KEY || 'app-key';
export const APP_SECRET = process.env.SOCKUDO_APP_SECRET || 'app-secret';

/** Default bound for every awaited event. */
export const WAIT_MS = 5000;
/** Per-test timeout passed to node:test. */
export const TEST_TIMEOUT = 30000;

export { Pusher, PusherServer, WebSocket };

/** A unique suffix so every test uses its own channels / users. */
export function uniq(prefix = '') {
  return `${prefix}${Date.now().toString(36)}-${randomBytes(5).toString('hex')}`;
}

/**
 * Waits for `event` on `emitter` (a pusher-js EventsDispatcher with
 * bind/unbind, or a Node EventEmitter with on/off).
 * Resolves with the first argument (or all arguments with `all: true`) of the
 * first emission for which `filter(...args)` is truthy; rejects after `timeout`.
 * The returned promise is pre-marked as handled, so creating it before an
 * action that throws does not produce an unhandled rejection.
 */
export function waitFor(emitter, event, { timeout = WAIT_MS, filter = () => true, all = false, label } = {}) {
  const usesBind = typeof emitter.bind === 'function' && typeof emitter.unbind === 'function'
    && typeof emitter.on !== 'function';
  const on = (fn) => (usesBind ? emitter.bind(event, fn) : emitter.on(event, fn));
  const off = (fn) => (usesBind ? emitter.unbind(event, fn) : emitter.off(event, fn));
  let handler;
  let timer;
  const p = new Promise((resolve, reject) => {
    handler = (...args) => {
      let ok;
      try {
        ok = filter(...args);
      } catch (err) {
        clearTimeout(timer);
        off(handler);
        reject(err);
        return;
      }
      if (!ok) return;
      clearTimeout(timer);
      off(handler);
      resolve(all ? args : args[0]);
    };
    timer = setTimeout(() => {
      off(handler);
      reject(new Error(`timed out after ${timeout} ms waiting for '${label || event}'`));
    }, timeout);
    on(handler);
  });
  p.catch(() => {});
  /** Stops waiting (clears the timer and the listener) without settling. */
  p.cancel = () => {
    clearTimeout(timer);
    off(handler);
  };
  return p;
}

/** Records every emission of `event` on a pusher-js dispatcher as [args]. */
export function record(dispatcher, event) {
  const seen = [];
  dispatcher.bind(event, (...args) => seen.push(args));
  return seen;
}

/** The official Node server SDK pointed at sockudo. */
export function serverSdk(overrides = {}) {
  return new PusherServer({
    appId: APP_ID,
    key: APP_KEY,
    secret: APP_SECRET,
    host: HOST,
    port: PORT,
    useTLS: false,
    timeout: WAIT_MS,
    ...overrides,
  });
}

/** pusher-js options common to every client (plain ws to HOST:PORT). */
export function clientOptions(extra = {}) {
  return {
    cluster: 'mt1',
    wsHost: HOST,
    wsPort: PORT,
    forceTLS: false,
    enabledTransports: ['ws'],
    enableStats: false,
    ...extra,
  };
}

/** channelAuthorization option that signs with the given server SDK. */
export function sdkChannelAuthorization(sdk, presenceData) {
  return {
    customHandler: ({ socketId, channelName }, callback) => {
      try {
        const data = channelName.startsWith('presence-') ? presenceData : undefined;
        callback(null, sdk.authorizeChannel(socketId, channelName, data));
      } catch (err) {
        callback(err, null);
      }
    },
  };
}

/**
 * Creates a pusher-js client, registers its disconnect with `t.after`, and
 * waits until it is connected.
 */
export async function connectPusher(t, options = {}, key = APP_KEY) {
  const client = new Pusher(key, clientOptions(options));
  t.after(() => client.disconnect());
  await waitFor(client.connection, 'state_change', {
    filter: ({ current }) => {
      if (current === 'failed' || current === 'unavailable') {
        throw new Error(`pusher-js connection went to '${current}' instead of 'connected'`);
      }
      return current === 'connected';
    },
    label: 'state_change -> connected',
  });
  return client;
}

/** Subscribes and waits for pusher:subscription_succeeded; resolves [channel, data]. */
export async function subscribe(client, name) {
  const channel = client.subscribe(name);
  const errored = waitFor(channel, 'pusher:subscription_error', { timeout: WAIT_MS + 1000 });
  const ok = waitFor(channel, 'pusher:subscription_succeeded', { label: `subscription_succeeded(${name})` });
  try {
    const data = await Promise.race([
      ok,
      errored.then((err) => {
        throw new Error(`subscription to ${name} failed: ${JSON.stringify(err)}`);
      }),
    ]);
    return [channel, data];
  } finally {
    ok.cancel();
    errored.cancel();
  }
}

/**
 * A raw protocol client on top of `ws`: buffers every frame so that
 * `next(filter)` never misses a frame that arrived before it was called.
 */
export class RawClient {
  constructor(url) {
    this.url = url;
    this.frames = []; // parsed frames, in arrival order
    this.rawFrames = []; // raw text
    this.cursor = 0;
    this.waiters = new Set();
    this.closed = null; // {code, reason}
    this.closeWaiters = new Set();
    this.ws = new WebSocket(url);
    this.ws.on('message', (buf, isBinary) => {
      const text = buf.toString();
      this.rawFrames.push({ text, isBinary });
      let msg;
      try {
        msg = JSON.parse(text);
      } catch {
        msg = { unparsable: text };
      }
      this.frames.push(msg);
      for (const w of [...this.waiters]) w();
    });
    this.ws.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      for (const w of [...this.waiters]) w();
      for (const w of [...this.closeWaiters]) w();
    });
    this.ws.on('error', (err) => {
      this.error = err;
      for (const w of [...this.waiters]) w();
    });
  }

  static url({ key = APP_KEY, query = 'protocol=7&client=js&version=8.4.0&flash=false' } = {}) {
    return `ws://${HOST}:${PORT}/app/${key}?${query}`;
  }

  /** Connects and resolves the pusher:connection_established data (decoded). */
  static async connect(t, opts = {}) {
    const c = new RawClient(RawClient.url(opts));
    t.after(() => c.close());
    const est = await c.next((f) => f.event === 'pusher:connection_established', { label: 'pusher:connection_established' });
    c.socketId = decodeData(est.data).socket_id;
    return c;
  }

  send(event, data, channel) {
    const frame = { event, data };
    if (channel !== undefined) frame.channel = channel;
    this.ws.send(JSON.stringify(frame));
  }

  /**
   * Resolves the first not-yet-consumed frame matching `filter`; frames
   * before it that don't match stay available to later `next` calls.
   */
  next(filter = () => true, { timeout = WAIT_MS, label = 'frame' } = {}) {
    const p = new Promise((resolve, reject) => {
      let timer;
      const check = () => {
        for (let i = 0; i < this.frames.length; i++) {
          if (this.frames[i] && !this.frames[i].__consumed && filter(this.frames[i])) {
            Object.defineProperty(this.frames[i], '__consumed', { value: true });
            this.waiters.delete(check);
            clearTimeout(timer);
            resolve(this.frames[i]);
            return;
          }
        }
        if (this.closed || this.error) {
          this.waiters.delete(check);
          clearTimeout(timer);
          reject(new Error(`connection ${this.closed ? `closed (code ${this.closed.code})` : `errored (${this.error.message})`} while waiting for ${label}; frames so far: ${JSON.stringify(this.frames)}`));
        }
      };
      timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`timed out after ${timeout} ms waiting for ${label}; frames so far: ${JSON.stringify(this.frames)}`));
      }, timeout);
      this.waiters.add(check);
      check();
    });
    p.catch(() => {});
    return p;
  }

  /** Resolves {code, reason} once the server closes the socket. */
  waitClose({ timeout = WAIT_MS } = {}) {
    const p = new Promise((resolve, reject) => {
      if (this.closed) return resolve(this.closed);
      const timer = setTimeout(() => {
        this.closeWaiters.delete(done);
        reject(new Error(`timed out after ${timeout} ms waiting for the server to close the socket; frames: ${JSON.stringify(this.frames)}`));
      }, timeout);
      const done = () => {
        clearTimeout(timer);
        this.closeWaiters.delete(done);
        resolve(this.closed);
      };
      this.closeWaiters.add(done);
    });
    p.catch(() => {});
    return p;
  }

  /** Subscribes (optionally with auth) and waits for the succeeded frame. */
  async subscribe(channel, auth = {}) {
    this.send('pusher:subscribe', { channel, ...auth });
    const f = await this.next(
      (m) => m.channel === channel
        && (m.event === 'pusher_internal:subscription_succeeded' || m.event === 'pusher:subscription_error' || m.event === 'pusher:error'),
      { label: `subscription_succeeded(${channel})` },
    );
    if (f.event !== 'pusher_internal:subscription_succeeded') {
      throw new Error(`subscription to ${channel} failed: ${JSON.stringify(f)}`);
    }
    return f;
  }

  /** Round trip barrier: pusher:ping -> pusher:pong. */
  async ping() {
    this.send('pusher:ping', {});
    return this.next((m) => m.event === 'pusher:pong', { label: 'pusher:pong' });
  }

  close() {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) {
      this.ws.terminate();
    }
  }
}

/** Pusher frames carry `data` either as a JSON string or as an object. */
export function decodeData(data) {
  if (typeof data === 'string') {
    try {
      return JSON.parse(data);
    } catch {
      return data;
    }
  }
  return data;
}

/** Bounds an arbitrary promise. */
export function withTimeout(promise, label, timeout = WAIT_MS) {
  let timer;
  const p = Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${timeout} ms waiting for ${label}`)), timeout);
    }),
  ]).finally(() => clearTimeout(timer));
  p.catch(() => {});
  return p;
}

/**
 * When the *server* closes a pusher-js connection with a 4xxx code, pusher-js
 * reacts by calling close() on the already-closed faye-websocket client, which
 * arms a 30 s close timer that keeps Node alive after the test. Grab the
 * underlying socket before the server closes it and clear that timer at the
 * end of the test (test hygiene only: no effect on what is asserted).
 */
export function clearCloseTimerAfter(t, client) {
  const socket = client.connection?.connection?.transport?.socket;
  t.after(() => {
    if (socket && socket._closeTimer) clearTimeout(socket._closeTimer);
  });
}
