// The Leptos client at `/` (server-rendered, then hydrated by the wasm that
// `cargo leptos build --release` puts under target/site/pkg), in Debian's
// Chromium against real kinesis-chat servers:
//
// - the shared client suite (chat-suite.mjs), as for the plain client;
// - issue #4's cross-client and Leptos-only checks: the two clients talk to
//   each other, hostile text stays text in both (and in the server's HTML),
//   the first HTML already holds the room and its history, hydration is
//   clean on `/`, `/?room=x` and a 404 page, rooms switch without a reload;
// - on the Kinesis backend (kinesis-mock), two server instances on one
//   stream: browsers on different instances talk, and a killed instance's
//   browser reconnects and catches up once, in order (leptos-kinesis.test.mjs).
//
// The server binary is KINESIS_CHAT_BIN (CI: the cargo-leptos release build).
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { chatSuite } from './chat-suite.mjs';
import { failOnHydrationWarnings, requireSite } from './leptos-support.mjs';
import {
  CLIENTS, chatTest, countMessages, frames, hook, listScroll, postMessage, readMessages, scriptedSocket, send, setName,
  uniqueRoom, useBrowser, waitForMessage, waitForStatus,
} from './support.mjs';

const HOSTILE_AUTHOR = '<img src=x onerror="window.__pwned=1">';
const HOSTILE_TEXT = '<script>window.__pwned=1</script> <a href="javascript:window.__pwned=1">x</a> <b>bold?</b>';

requireSite();
chatSuite(CLIENTS.leptos);

const browser = useBrowser();
const { leptos, plain } = CLIENTS;

chatTest('[leptos+plain] the Leptos page and the plain page exchange messages both ways', browser, async (h) => {
  const server = await h.server();
  const room = uniqueRoom('cross');
  const l = await h.open(server, leptos, { query: `?room=${room}`, label: 'leptos' });
  const p = await h.open(server, plain, { query: `?room=${room}`, label: 'plain' });
  await setName(l, 'lena');
  await setName(p, 'paul');
  await waitForStatus(l, 'live');
  await waitForStatus(p, 'live');

  await send(l, 'from leptos\nwith a second line');
  await waitForMessage(p, { text: 'from leptos\nwith a second line', author: 'lena' });
  await send(p, 'from plain');
  await waitForMessage(l, { text: 'from plain', author: 'paul' });
  await waitForMessage(l, { text: 'from leptos\nwith a second line', author: 'lena' });
  const expected = [
    { author: 'lena', text: 'from leptos\nwith a second line' },
    { author: 'paul', text: 'from plain' },
  ];
  assert.deepEqual(await readMessages(l), expected);
  assert.deepEqual(await readMessages(p), expected);
  // My messages look different from the others'.
  const mine = await l.locator('[data-testid="message"].mine [data-testid="text"]').allTextContents();
  assert.deepEqual(mine, ['from leptos\nwith a second line']);
});

chatTest('[leptos+plain] hostile text and author stay text across clients and in the server-rendered HTML', browser, async (h) => {
  const server = await h.server();
  const room = uniqueRoom('xss2');
  const l = await h.open(server, leptos, { query: `?room=${room}`, label: 'leptos' });
  const p = await h.open(server, plain, { query: `?room=${room}`, label: 'plain' });
  await setName(l, HOSTILE_AUTHOR);
  await setName(p, HOSTILE_AUTHOR);
  await waitForStatus(l, 'live');
  await waitForStatus(p, 'live');
  await send(l, `${HOSTILE_TEXT} (leptos)`);
  await send(p, `${HOSTILE_TEXT} (plain)`);
  for (const page of [l, p]) {
    await waitForMessage(page, { text: `${HOSTILE_TEXT} (leptos)`, author: HOSTILE_AUTHOR });
    await waitForMessage(page, { text: `${HOSTILE_TEXT} (plain)`, author: HOSTILE_AUTHOR });
  }

  // The first HTML (no script run) carries them escaped.
  const res = await fetch(new URL(`/?room=${room}`, server.url));
  assert.equal(res.status, 200);
  const html = await res.text();
  assert.ok(!html.includes('<script>window.__pwned'), 'message text reached the HTML as markup');
  assert.ok(!html.includes('<img src=x'), 'author reached the HTML as markup');
  assert.ok(html.includes('&lt;script&gt;window.__pwned=1&lt;/script&gt;'), 'the escaped text is in the HTML');
  assert.match(res.headers.get('content-security-policy') ?? '', /script-src 'self' 'nonce-/);

  const fresh = await h.open(server, leptos, { query: `?room=${room}`, label: 'fresh' });
  await waitForMessage(fresh, { text: `${HOSTILE_TEXT} (plain)`, author: HOSTILE_AUTHOR });
  for (const page of [l, p, fresh]) {
    const injected = await hook(page, 'message-list').evaluate((list) =>
      list.querySelectorAll('script, img, a, b').length);
    assert.equal(injected, 0, 'message data became elements');
    assert.equal(await page.evaluate(() => window.__pwned), undefined, 'injected code ran');
  }
});

chatTest('[leptos] the first HTML holds the room and its history; the page hydrates without warnings', browser, async (h) => {
  const server = await h.server();
  const room = uniqueRoom('ssr');
  await postMessage(server, { room, author: 'sam', text: 'rendered by the server\nline two' });
  await postMessage(server, { room, author: 'sam', text: 'second' });

  // Without JavaScript: the raw HTML.
  const res = await fetch(new URL(`/?room=${room}`, server.url));
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /text\/html/);
  const html = await res.text();
  assert.match(html, new RegExp(`data-testid="room"[^>]*>${room}<`));
  assert.ok(html.includes('rendered by the server\nline two'), 'history is in the first HTML');
  assert.ok(html.includes('data-state="connecting"'));
  assert.match(html, /<title>#[^<]+ · kinesis-chat<\/title>/);

  for (const query of ['', `?room=${room}`, '?room=Not%20A%20Room']) {
    const context = await h.browser.newContext();
    h.contexts.push(context);
    const page = await context.newPage();
    h.watch(page, `ssr ${query || '/'}`);
    failOnHydrationWarnings(h, page);
    await page.goto(new URL(`/${query}`, server.url).href);
    await leptos.ready(page);
    await waitForStatus(page, 'live');
    if (query === `?room=${room}`) {
      // Hydration took the server's list over: the socket resumed after
      // it (no duplicates), and new messages still arrive.
      await postMessage(server, { room, author: 'sam', text: 'after hydration' });
      await waitForMessage(page, { text: 'after hydration', author: 'sam' });
      assert.deepEqual((await readMessages(page)).map((m) => m.text),
        ['rendered by the server\nline two', 'second', 'after hydration']);
    }
    if (query.includes('Not')) {
      assert.equal((await hook(page, 'room').textContent()).trim(), 'lobby');
      await page.getByText(/is not a room name/).waitFor();
    }
  }
});

chatTest('[leptos] an unknown path is a real 404 page that hydrates cleanly; /api/ keeps the JSON 404', browser, async (h) => {
  const server = await h.server();
  const res = await fetch(new URL('/no/such/page', server.url));
  assert.equal(res.status, 404);
  assert.match(res.headers.get('content-type') ?? '', /text\/html/);
  assert.match(await res.text(), /Page not found/);
  const api = await fetch(new URL('/api/nope', server.url));
  assert.equal(api.status, 404);
  assert.match(api.headers.get('content-type') ?? '', /application\/json/);
  assert.ok((await api.json()).error);

  const context = await h.browser.newContext();
  h.contexts.push(context);
  const page = await context.newPage();
  h.watch(page, '404');
  failOnHydrationWarnings(h, page);
  // The browser logs the 404 of the document itself.
  h.expectConsole(/status of 404/);
  const response = await page.goto(new URL('/no/such/page', server.url).href);
  assert.equal(response.status(), 404);
  await leptos.ready(page);
  await page.getByRole('heading', { name: 'Page not found' }).waitFor();
  await page.getByRole('link', { name: /lobby/i }).click();
  await waitForStatus(page, 'live');
  assert.equal((await hook(page, 'room').textContent()).trim(), 'lobby');
});

chatTest('[leptos] switching rooms keeps the page (no reload), changes the URL and the messages', browser, async (h) => {
  const server = await h.server();
  const a = uniqueRoom('swa');
  const b = uniqueRoom('swb');
  await postMessage(server, { room: a, author: 'x', text: 'in room a' });
  await postMessage(server, { room: b, author: 'y', text: 'in room b' });
  const page = await h.open(server, leptos, { query: `?room=${a}` });
  await setName(page, 'walker');
  await waitForStatus(page, 'live');
  await waitForMessage(page, { text: 'in room a' });
  await page.evaluate(() => { window.__samePage = true; });

  await page.getByLabel('Go to room').fill(b);
  await page.getByLabel('Go to room').press('Enter');
  await page.waitForURL((url) => url.searchParams.get('room') === b);
  await waitForMessage(page, { text: 'in room b' });
  await waitForStatus(page, 'live');
  assert.equal((await hook(page, 'room').textContent()).trim(), b);
  assert.equal(await countMessages(page, 'in room a'), 0);
  assert.equal(await page.evaluate(() => window.__samePage), true, 'the page was reloaded');
  assert.equal(await page.title(), `#${b} · kinesis-chat`);
  await send(page, 'hello b');
  await waitForMessage(page, { text: 'hello b', author: 'walker' });
  const inB = await (await fetch(new URL(`/api/messages?room=${b}`, server.url))).json();
  assert.deepEqual(inB.messages.map((m) => m.message.text), ['in room b', 'hello b']);

  // Back goes back to room a, still without a reload.
  await page.goBack();
  await waitForMessage(page, { text: 'in room a' });
  await waitForStatus(page, 'live');
  assert.equal(await countMessages(page, 'hello b'), 0);
  assert.equal(await page.evaluate(() => window.__samePage), true);
});

chatTest('[leptos] the counter appears near the limit; over it the shared rule refuses before sending', browser, async (h) => {
  const server = await h.server();
  const page = await h.open(server, leptos, { query: `?room=${uniqueRoom('count')}` });
  await setName(page, 'cole');
  await waitForStatus(page, 'live');
  const box = hook(page, 'message-input');
  await box.fill('x'.repeat(3990));
  await page.getByText('10 characters left').waitFor();
  await box.fill('😀'.repeat(4001));
  await page.getByText('1 character too many').waitFor();
  await box.press('Enter');
  await page.getByText('Message must be at most 4000 characters (it has 4001).').waitFor();
  assert.equal(await hook(page, 'message').count(), 0, 'nothing was sent');
  assert.equal((await box.inputValue()).length, 2 * 4001, 'the draft is kept');
});

chatTest('[leptos] a "new messages" pill appears while scrolled up and jumps to the newest', browser, async (h) => {
  const server = await h.server();
  const room = uniqueRoom('pill');
  for (let i = 0; i < 25; i += 1) await postMessage(server, { room, author: 'f', text: `filler ${i}\nmore` });
  const page = await h.open(server, leptos, { query: `?room=${room}` });
  await waitForStatus(page, 'live');
  await listScroll(page, 'top');
  const pill = page.getByRole('button', { name: /new messages/i });
  assert.equal(await pill.count(), 0);
  await postMessage(server, { room, author: 'f', text: 'arrived while scrolled up' });
  await waitForMessage(page, { text: 'arrived while scrolled up' });
  await pill.waitFor();
  assert.equal((await listScroll(page)).top, 0);
  await pill.click();
  await pill.waitFor({ state: 'hidden' });
  const { top, max } = await listScroll(page);
  assert.ok(max - top <= 4, `not at the bottom: ${top}/${max}`);
  assert.equal(await page.evaluate(() => document.activeElement?.dataset.testid), 'message-input');
});

chatTest('[leptos] a silent socket is replaced: after server heartbeats stop, and when the browser comes back online', browser, async (h) => {
  const server = await h.server();
  const room = uniqueRoom('alive');
  let socket;
  const page = await h.open(server, leptos, {
    query: `?room=${room}`,
    setup: async (p) => { socket = await scriptedSocket(p); },
  });
  const msg = (text) => ({ id: randomUUID(), room, author: 'script', text, sent_at: new Date().toISOString() });

  // Heartbeat frames (a protocol extension the client honours when a server
  // sends them) every second, then silence: a dead socket without a close.
  const c0 = await socket.connection(0);
  c0.send(frames.message('c1', msg('one')));
  c0.send(frames.ready('c1'));
  await waitForStatus(page, 'live');
  for (let i = 0; i < 3; i += 1) {
    c0.send(JSON.stringify({ type: 'heartbeat' }));
    await new Promise((r) => setTimeout(r, 1000));
  }
  const c1 = await socket.connection(1, 15_000);
  assert.equal(new URL(c1.url()).searchParams.get('since'), 'c1');
  c1.send(frames.message('c2', msg('two')));
  c1.send(frames.ready('c2'));
  await waitForMessage(page, { text: 'two' });

  // Without heartbeats a quiet socket is left alone, but coming back online
  // replaces it at once (the old one may have died with the network).
  await page.context().setOffline(true);
  await page.context().setOffline(false);
  const c2 = await socket.connection(2);
  assert.equal(new URL(c2.url()).searchParams.get('since'), 'c2');
  c2.send(frames.ready('c2'));
  await waitForStatus(page, 'live');
  assert.deepEqual((await readMessages(page)).map((m) => m.text), ['one', 'two']);
});
