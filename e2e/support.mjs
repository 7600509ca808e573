// Shared helpers for kinesis-chat's browser tests.
//
// - startServer(): runs the real `kinesis-chat` binary on 127.0.0.1 and learns
//   its URL from the line it prints on stdout.
// - useBrowser() / chatTest(): one Debian Chromium per test file (driven by
//   npm playwright-core; never a downloaded browser), a fresh context per
//   page, and every test fails on a console error or an uncaught page error.
// - Page helpers that use only the `data-testid` hooks of PROTOCOL.md ("UI
//   test hooks"). Both clients carry them, so each helper takes a CLIENTS
//   entry and works for the plain client at /plain/ and the Leptos one at /.
//
// Every wait here is bounded; nothing sleeps where a condition can be awaited.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const ARTIFACTS = path.join(REPO, 'test-artifacts');
export const SERVER_BIN = process.env.KINESIS_CHAT_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(REPO, 'target'), 'debug', 'kinesis-chat');
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

/** How long a single expectation may take before the test fails. */
export const WAIT_MS = 10_000;
/** How long one whole test may take. */
export const TEST_TIMEOUT_MS = 90_000;

export const VIEWPORTS = {
  desktop: { width: 1280, height: 800 },
  phone: { width: 390, height: 844 },
};

/**
 * The clients under test. `path` is where the server serves it; `ready`
 * resolves once the page is interactive (after `page.goto` has loaded it).
 */
export const CLIENTS = {
  plain: {
    name: 'plain',
    path: '/plain/',
    // plain.js is a deferred script: it has run by the `load` event goto waits for.
    ready: async (page) => {
      await page.locator('[data-testid="room"]').filter({ hasText: /\S/ }).waitFor({ timeout: WAIT_MS });
    },
  },
  leptos: {
    name: 'leptos',
    path: '/',
    ready: async (page) => {
      await page.locator('body[data-hydrated="true"]').waitFor({ timeout: WAIT_MS });
    },
  },
};
/** Every client path, for suites that run once per client. */
export const clientPaths = Object.values(CLIENTS).map((c) => c.path);

// ---- the server ------------------------------------------------------------

const LISTENING = /^kinesis-chat listening on (http:\/\/127\.0\.0\.1:(\d+))\/?\s*$/;
const STDERR_TAIL_BYTES = 16_384;
const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * Starts `kinesis-chat --listen <listen> ...args` and resolves once it prints
 * its listening line. `listen` defaults to an ephemeral port; pass
 * `127.0.0.1:<port>` to come back on the port of a server that was stopped.
 */
export async function startServer({ listen = '127.0.0.1:0', args = [], env = {}, timeoutMs = 20_000 } = {}) {
  const child = spawn(SERVER_BIN, ['--listen', listen, ...args], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-STDERR_TAIL_BYTES);
  });
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    });
  });
  const lines = readline.createInterface({ input: child.stdout });

  const url = await new Promise((resolve, reject) => {
    const fail = (why) => {
      cleanup();
      child.kill('SIGKILL');
      reject(new Error(`${SERVER_BIN} ${why}\n--- server stderr (tail) ---\n${stderr}`));
    };
    const timer = setTimeout(() => fail(`printed no listening line within ${timeoutMs} ms`), timeoutMs);
    const onLine = (line) => {
      const m = LISTENING.exec(line);
      if (!m) return;
      cleanup();
      resolve(m[1]);
    };
    const onError = (err) => fail(`could not start: ${err.message} (set KINESIS_CHAT_BIN or build with cargo build -p server)`);
    const onExit = () => exited.then(({ code, signal }) => fail(`exited (${signal || code}) before listening`));
    function cleanup() {
      clearTimeout(timer);
      lines.off('line', onLine);
      child.off('error', onError);
      child.off('exit', onExit);
    }
    lines.on('line', onLine);
    child.once('error', onError);
    child.once('exit', onExit);
  });

  const port = Number(new URL(url).port);
  return {
    url,
    port,
    /** `127.0.0.1:<port>`: pass as `listen` to start a successor on the same port. */
    listen: `127.0.0.1:${port}`,
    process: child,
    exited,
    stderr: () => stderr,
    /** Signals the server and waits for it to exit; SIGKILL after `timeoutMs`. */
    async stop({ signal = 'SIGTERM', timeoutMs = 10_000 } = {}) {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill(signal);
      let timer;
      const timedOut = new Promise((resolve) => { timer = setTimeout(() => resolve('timeout'), timeoutMs); });
      const first = await Promise.race([exited, timedOut]);
      clearTimeout(timer);
      if (first === 'timeout') {
        child.kill('SIGKILL');
        await exited;
        throw new Error(`server did not exit within ${timeoutMs} ms of ${signal}\n${stderr}`);
      }
      return first;
    },
    /** Kills the server abruptly, as a crash or an OOM kill would. */
    kill() {
      return this.stop({ signal: 'SIGKILL' });
    },
  };
}

// ---- the browser -------------------------------------------------------------

/** Launches one Chromium for this test file; returns a getter for it. */
export function useBrowser() {
  let browser = null;
  before(async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: CHROMIUM_ARGS,
      timeout: 30_000,
    });
  });
  after(async () => {
    await browser?.close();
  });
  return () => {
    assert.ok(browser, 'the browser was not launched (is /usr/bin/chromium installed?)');
    return browser;
  };
}

/**
 * Defines a test that gets a Harness (servers and pages it cleans up) and
 * fails on any console error or page error its pages saw, unless the test
 * declared that console error as expected with `h.expectConsole(/regex/)`.
 */
export function chatTest(name, browser, fn, { timeout = TEST_TIMEOUT_MS } = {}) {
  test(name, { timeout }, async (t) => {
    const h = new Harness(browser(), t.name);
    try {
      await fn(h, t);
      h.assertNoBrowserErrors();
    } finally {
      await h.close();
    }
  });
}

export class Harness {
  constructor(browser, testName) {
    this.browser = browser;
    this.testName = testName;
    this.servers = [];
    this.contexts = [];
    this.errors = [];
    this.expected = [];
  }

  /** Starts a server that is stopped when the test ends. */
  async server(opts) {
    const server = await startServer(opts);
    this.servers.push(server);
    return server;
  }

  /**
   * Declares console errors this test provokes on purpose, such as the
   * browser's own "Failed to load resource: ... 503" or a refused
   * WebSocket. Page errors (uncaught exceptions) are never excused.
   */
  expectConsole(...patterns) {
    this.expected.push(...patterns);
  }

  /**
   * Opens `client` on `server` in a fresh browser context (its own
   * localStorage) and waits until the page is interactive.
   * `setup(page)` runs before navigation (routes, init scripts).
   */
  async open(server, client, { query = '', viewport = VIEWPORTS.desktop, setup, label } = {}) {
    const context = await this.browser.newContext({ viewport });
    this.contexts.push(context);
    const page = await context.newPage();
    this.watch(page, label ?? `page ${this.contexts.length}`);
    page.setDefaultTimeout(WAIT_MS);
    page.setDefaultNavigationTimeout(15_000);
    if (setup) await setup(page);
    await page.goto(new URL(client.path + query, server.url).href);
    await client.ready(page);
    return page;
  }

  /** Records console errors and page errors of `page` (also after reloads). */
  watch(page, label) {
    page.on('console', (msg) => {
      if (msg.type() !== 'error') return;
      const where = msg.location()?.url ? ` (${msg.location().url})` : '';
      this.errors.push({ label, kind: 'console', text: msg.text() + where });
    });
    page.on('pageerror', (err) => {
      this.errors.push({ label, kind: 'pageerror', text: String(err?.stack || err) });
    });
  }

  assertNoBrowserErrors() {
    const unexpected = this.errors.filter(
      (e) => e.kind === 'pageerror' || !this.expected.some((re) => re.test(e.text)),
    );
    assert.deepEqual(unexpected, [], 'the pages logged errors');
  }

  async close() {
    await Promise.allSettled(this.contexts.map((c) => c.close()));
    await Promise.allSettled(this.servers.map((s) => s.stop()));
  }
}

// ---- page helpers (data-testid hooks only) -----------------------------------

export const hook = (page, id) => page.locator(`[data-testid="${id}"]`);
export const messageItems = (page) => page.locator('[data-testid="message-list"] [data-testid="message"]');

/** The messages on screen, in order, as {id?, author, text} (text as in the DOM). */
export function readMessages(page) {
  return messageItems(page).evaluateAll((items) => items.map((li) => ({
    author: li.querySelector('[data-testid="author"]')?.textContent ?? null,
    text: li.querySelector('[data-testid="text"]')?.textContent ?? null,
  })));
}

/** Types a name into the name field. */
export async function setName(page, name) {
  await hook(page, 'name-input').fill(name);
}

/** Types `text` into the message field and presses Enter. */
export async function send(page, text) {
  const box = hook(page, 'message-input');
  await box.fill(text);
  await box.press('Enter');
}

/** Waits for the status hook's data-state to be `state`. */
export async function waitForStatus(page, state, timeout = WAIT_MS) {
  await page.locator(`[data-testid="status"][data-state="${state}"]`).waitFor({ timeout });
}

/**
 * Waits until exactly `count` messages with this text (and author, if given)
 * are on screen. The text is compared with textContent, exactly.
 */
export async function waitForMessage(page, { text, author }, { count = 1, timeout = WAIT_MS } = {}) {
  try {
    await page.waitForFunction(({ text, author, count }) => {
      const items = document.querySelectorAll('[data-testid="message-list"] [data-testid="message"]');
      let n = 0;
      for (const li of items) {
        const t = li.querySelector('[data-testid="text"]')?.textContent;
        const a = li.querySelector('[data-testid="author"]')?.textContent;
        if (t === text && (author === undefined || a === author)) n += 1;
      }
      return n === count;
    }, { text, author, count }, { timeout, polling: 50 });
  } catch (err) {
    const shown = await readMessages(page).catch(() => '(page gone)');
    throw new Error(`expected ${count} × ${JSON.stringify({ author, text })}; on screen: ${JSON.stringify(shown)}\n${err.message}`);
  }
}

/** How many messages with exactly this text are on screen. */
export async function countMessages(page, text) {
  return (await readMessages(page)).filter((m) => m.text === text).length;
}

/** A locator for the on-screen message whose text is exactly `text`. */
export function messageWithText(page, text) {
  return messageItems(page).filter({
    has: page.locator('[data-testid="text"]').filter({ hasText: new RegExp(`^${escapeRegExp(text)}$`) }),
  });
}

export function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** A room name no other test uses. */
export function uniqueRoom(prefix = 'r') {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}

/** Saves a full-page screenshot to test-artifacts/<name>.png and returns its path. */
export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: false });
  return file;
}

/** POSTs a message straight to the server's API (not through a page). */
export async function postMessage(server, body, { expectStatus = 201 } = {}) {
  const res = await fetch(new URL('/api/messages', server.url), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(WAIT_MS),
  });
  const payload = await res.json();
  assert.equal(res.status, expectStatus, `POST /api/messages answered ${res.status}: ${JSON.stringify(payload)}`);
  return payload;
}

/**
 * The scroll position of the element that scrolls the message list (the
 * list itself or its nearest scrolling ancestor, else the document).
 */
export function listScroll(page, to) {
  return hook(page, 'message-list').evaluate((list, to) => {
    let el = list;
    while (el && el !== document.body) {
      const style = getComputedStyle(el);
      if (/(auto|scroll)/.test(style.overflowY) && el.scrollHeight > el.clientHeight) break;
      el = el.parentElement;
    }
    if (!el || el === document.body) el = document.scrollingElement;
    if (to === 'top') el.scrollTop = 0;
    if (to === 'bottom') el.scrollTop = el.scrollHeight;
    return { top: el.scrollTop, max: el.scrollHeight - el.clientHeight };
  }, to ?? null);
}

/**
 * Replaces the page's WebSocket to /ws with a scripted one (playwright's
 * routeWebSocket): the test sends frames and closes with chosen codes.
 * Call before navigation. `connection(i)` waits for the i-th (0-based) socket.
 */
export async function scriptedSocket(page) {
  const connections = [];
  const waiters = new Set();
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    connections.push(ws);
    for (const wake of waiters) wake();
  });
  return {
    connections,
    async connection(i, timeout = WAIT_MS) {
      const deadline = Date.now() + timeout;
      while (connections.length <= i) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`socket #${i} was not opened within ${timeout} ms (${connections.length} so far)`);
        await new Promise((resolve) => {
          const timer = setTimeout(done, left);
          function done() {
            clearTimeout(timer);
            waiters.delete(done);
            resolve();
          }
          waiters.add(done);
        });
      }
      return connections[i];
    },
  };
}

/** Frames as PROTOCOL.md spells them, for scripted sockets. */
export const frames = {
  message: (cursor, message) => JSON.stringify({ type: 'message', cursor, message }),
  ready: (cursor) => JSON.stringify({ type: 'ready', cursor }),
  reset: (reason = 'cursor unknown') => JSON.stringify({ type: 'reset', reason }),
};
