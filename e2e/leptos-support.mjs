// Helpers for the Leptos client's browser tests: the built site (and its
// size), hydration warnings, and a kinesis-mock emulator for the tests that
// run several server instances on one stream.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { before } from 'node:test';
import { gzipSync } from 'node:zlib';
import { ARTIFACTS, REPO } from './support.mjs';

export const SITE_PKG = path.join(process.env.LEPTOS_SITE_ROOT
  ? path.resolve(REPO, process.env.LEPTOS_SITE_ROOT) : path.join(REPO, 'target', 'site'), 'pkg');

/** Fails early, with the fix, when the wasm was not built; logs its size. */
export function requireSite() {
  before(() => {
    // cargo-leptos writes kinesis-chat.wasm; a hand-run wasm-bindgen, *_bg.wasm.
    const wasm = ['kinesis-chat.wasm', 'kinesis-chat_bg.wasm'].map((f) => path.join(SITE_PKG, f)).find(existsSync)
      ?? path.join(SITE_PKG, 'kinesis-chat.wasm');
    assert.ok(existsSync(wasm), `${wasm} is missing: run \`cargo leptos build --release\` (scripts/build-release) first`);
    const sizes = readdirSync(SITE_PKG)
      .filter((f) => /\.(wasm|js|css)$/.test(f))
      .map((f) => {
        const bytes = readFileSync(path.join(SITE_PKG, f));
        return { file: f, bytes: bytes.length, gzip: gzipSync(bytes, { level: 9 }).length };
      });
    const total = sizes.reduce((a, s) => a + s.gzip, 0);
    const lines = sizes.map((s) => `${s.file}: ${(s.bytes / 1024).toFixed(1)} KiB, ${(s.gzip / 1024).toFixed(1)} KiB gzip`);
    lines.push(`total gzip: ${(total / 1024).toFixed(1)} KiB`);
    mkdirSync(ARTIFACTS, { recursive: true });
    writeFileSync(path.join(ARTIFACTS, 'leptos-bundle-size.txt'), `${lines.join('\n')}\n`);
    console.log(`# Leptos bundle (${SITE_PKG}):\n# ${lines.join('\n# ')}`);
  });
}

/** Fails the test on Leptos hydration warnings too (they are console warnings). */
export function failOnHydrationWarnings(h, page) {
  page.on('console', (msg) => {
    if (msg.type() === 'warning' && /hydrat/i.test(msg.text())) {
      h.errors.push({ label: 'hydration', kind: 'pageerror', text: msg.text() });
    }
  });
}

// ---- kinesis-mock ------------------------------------------------------------

const REGION = 'us-west-1';

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts kinesis-mock (npm kinesis-local) on free loopback ports with one
 * stream of `shards` shards, and resolves once it is healthy. Returns the
 * `env`/`args` a kinesis-chat instance needs to use it, and `stop()`.
 */
export async function startKinesisMock({ shards = 1 } = {}) {
  const main = path.join(REPO, 'node_modules', 'kinesis-local', 'main.js');
  assert.ok(existsSync(main), `${main} is missing: run scripts/setup (or npm ci)`);
  const port = await freePort();
  const tlsPort = await freePort();
  const stream = `e2e-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  const durations = ['CREATE_STREAM_DURATION', 'DELETE_STREAM_DURATION', 'SPLIT_SHARD_DURATION',
    'MERGE_SHARDS_DURATION', 'UPDATE_SHARD_COUNT_DURATION', 'REGISTER_STREAM_CONSUMER_DURATION'];
  let log = '';
  const child = spawn(process.execPath, [main], {
    env: {
      ...process.env,
      KINESIS_MOCK_CERT_PATH: path.join(REPO, 'node_modules', 'kinesis-local', 'server.json'),
      KINESIS_MOCK_PLAIN_PORT: String(port),
      KINESIS_MOCK_TLS_PORT: String(tlsPort),
      INITIALIZE_STREAMS: `${stream}:${shards}:${REGION}`,
      AWS_REGION: REGION,
      LOG_LEVEL: 'WARN',
      ...Object.fromEntries(durations.map((d) => [d, '0ms'])),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  for (const s of [child.stdout, child.stderr]) {
    s.setEncoding('utf8');
    s.on('data', (c) => { log = (log + c).slice(-8192); });
  }
  process.on('exit', () => child.kill('SIGKILL'));
  const endpoint = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 90_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`kinesis-mock exited (${child.exitCode})\n${log}`);
    try {
      const res = await fetch(`${endpoint}/healthcheck`, { signal: AbortSignal.timeout(2000) });
      if (res.ok) break;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`kinesis-mock did not become healthy in 90 s\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return {
    endpoint,
    stream,
    /** For startServer/h.server: a kinesis-chat instance on this stream. */
    serverOptions: {
      args: ['--backend', 'kinesis', '--stream', stream, '--create-stream'],
      env: {
        AWS_ENDPOINT_URL_KINESIS: endpoint,
        AWS_REGION: REGION,
        AWS_ACCESS_KEY_ID: 'test',
        AWS_SECRET_ACCESS_KEY: 'test',
        AWS_EC2_METADATA_DISABLED: 'true',
      },
    },
    log: () => log,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await exited;
    },
  };
}
