// The development path (issue #4, test 6b): `trunk serve` builds the client
// with client-side rendering from index.html and proxies /api/ and /ws to a
// running kinesis-chat; the page it serves works against that server.
//
// The repo's Trunk.toml points at 127.0.0.1:3000; this test writes a copy
// (relative paths in a Trunk.toml are relative to the file) that points at
// a server on an ephemeral port and serves on another, so it never clashes
// with a chat a developer is running. Needs `trunk` (scripts/setup).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  REPO, chatTest, hook, readMessages, screenshot, send, setName, uniqueRoom, useBrowser, waitForMessage,
  waitForStatus,
} from './support.mjs';

const TRUNK = process.env.TRUNK_BIN || 'trunk';
// A cold debug build of the wasm takes minutes on two cores.
const BUILD_MS = 12 * 60_000;

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

const browser = useBrowser();

chatTest('[trunk] trunk serve builds the CSR client and proxies /api/ and /ws to the server', browser, async (h) => {
  const version = spawnSync(TRUNK, ['--version'], { encoding: 'utf8' });
  assert.equal(version.status, 0, `${TRUNK} is not installed (scripts/setup installs trunk 0.21.14)`);

  // Trunk.toml has `offline = true`, which makes cargo offline too: fetch first.
  const fetched = spawnSync('cargo', ['fetch'], { cwd: REPO, encoding: 'utf8' });
  assert.equal(fetched.status, 0, `cargo fetch failed\n${fetched.stderr}`);

  const server = await h.server();
  const port = await freePort();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'kinesis-chat-trunk-'));
  const config = readFileSync(path.join(REPO, 'Trunk.toml'), 'utf8')
    .replace(/^target = .*$/m, `target = ${JSON.stringify(path.join(REPO, 'index.html'))}`)
    .replace(/^dist = .*$/m, `dist = ${JSON.stringify(path.join(dir, 'dist'))}`)
    .replace(/^port = .*$/m, `port = ${port}`)
    .replaceAll('127.0.0.1:3000', `127.0.0.1:${server.port}`);
  assert.match(config, new RegExp(`backend = "ws://127.0.0.1:${server.port}/ws"`));
  writeFileSync(path.join(dir, 'Trunk.toml'), config);

  let log = '';
  const trunk = spawn(TRUNK, ['serve', '--config', path.join(dir, 'Trunk.toml'), '--no-autoreload'], {
    cwd: REPO,
    env: { ...process.env, NO_COLOR: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true, // its own process group: cargo and rustc stop with it
  });
  for (const s of [trunk.stdout, trunk.stderr]) {
    s.setEncoding('utf8');
    s.on('data', (c) => { log = (log + c).slice(-16_384); });
  }
  const stop = () => { try { process.kill(-trunk.pid, 'SIGTERM'); } catch { /* gone */ } };
  process.on('exit', stop);
  try {
    const base = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + BUILD_MS;
    for (;;) {
      assert.equal(trunk.exitCode, null, `trunk exited (${trunk.exitCode})\n${log}`);
      try {
        const res = await fetch(`${base}/`, { signal: AbortSignal.timeout(2000) });
        if (res.ok && /kinesis-chat/.test(await res.text())) break;
      } catch { /* still building */ }
      assert.ok(Date.now() < deadline, `trunk served nothing within ${BUILD_MS / 1000} s\n${log}`);
      await new Promise((r) => setTimeout(r, 1000));
    }

    // The proxy answers the API (not the SPA fallback's index.html).
    const room = uniqueRoom('trunk');
    const api = await fetch(`${base}/api/messages?room=${room}`);
    assert.equal(api.status, 200);
    assert.deepEqual(await api.json(), { messages: [] });

    const context = await h.browser.newContext();
    h.contexts.push(context);
    const page = await context.newPage();
    h.watch(page, 'trunk');
    await page.goto(`${base}/?room=${room}`);
    await page.locator('body[data-hydrated="true"]').waitFor({ timeout: 30_000 });
    assert.equal((await hook(page, 'room').textContent()).trim(), room);
    await setName(page, 'dev');
    await waitForStatus(page, 'live');
    await send(page, 'through the trunk proxy');
    await waitForMessage(page, { text: 'through the trunk proxy', author: 'dev' });
    const seen = await (await fetch(new URL(`/api/messages?room=${room}`, server.url))).json();
    assert.deepEqual(seen.messages.map((m) => m.message.text), ['through the trunk proxy']);
    await screenshot(page, 'leptos-trunk-desktop');
    assert.deepEqual(await readMessages(page), [{ author: 'dev', text: 'through the trunk proxy' }]);
  } finally {
    stop();
  }
}, { timeout: BUILD_MS + 120_000 });
