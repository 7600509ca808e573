// The browser test suite every kinesis-chat client must pass. It drives the
// page only through PROTOCOL.md's data-testid hooks plus a few visible words
// both clients share: "sending…" on a message not yet accepted, "not sent"
// and a "Retry" button on one that failed.
//
//   import { chatSuite } from './chat-suite.mjs';
//   import { CLIENTS } from './support.mjs';
//   chatSuite(CLIENTS.plain);    // e2e/plain.test.mjs
//   chatSuite(CLIENTS.leptos);   // a Leptos test file, once that client exists

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import {
  VIEWPORTS, WAIT_MS, chatTest, countMessages, frames, hook, listScroll, messageWithText,
  postMessage, readMessages, screenshot, scriptedSocket, send, setName, uniqueRoom,
  useBrowser, waitForMessage, waitForStatus,
} from './support.mjs';

// Console lines the browser itself writes when a test takes the server away.
const REFUSED = /net::ERR_CONNECTION_REFUSED|net::ERR_CONNECTION_RESET|net::ERR_EMPTY_RESPONSE/;
const STATUS_503 = /status of 503/;

const HOSTILE_AUTHOR = '<img src=x onerror="window.__pwned=1">';
const HOSTILE_TEXTS = [
  '<script>window.__pwned=1</script>',
  '<img src=x onerror="window.__pwned=1">',
  '[click](javascript:window.__pwned=1) <a href="javascript:window.__pwned=1">link</a> javascript:window.__pwned=1',
  '<svg onload="window.__pwned=1"></svg> &lt;b&gt; <b>not bold</b> <iframe src="javascript:window.__pwned=1"></iframe>',
];

export function chatSuite(client) {
  const browser = useBrowser();
  const inRoom = (room) => ({ query: `?room=${room}` });
  const label = (name) => `[${client.name}] ${name}`;

  chatTest(label('two pages in a room exchange messages both ways; another room sees none'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('pair');
    const otherRoom = uniqueRoom('other');
    const ana = await h.open(server, client, { ...inRoom(room), label: 'ana' });
    const bo = await h.open(server, client, { ...inRoom(room), label: 'bo' });
    const cy = await h.open(server, client, { ...inRoom(otherRoom), label: 'cy' });

    assert.equal((await hook(ana, 'room').textContent()).trim(), room);
    assert.equal((await hook(cy, 'room').textContent()).trim(), otherRoom);
    for (const [page, name] of [[ana, 'ana'], [bo, 'bo'], [cy, 'cy']]) {
      await setName(page, name);
      await waitForStatus(page, 'live');
    }

    await send(ana, 'hello from ana');
    await waitForMessage(bo, { text: 'hello from ana', author: 'ana' });
    await waitForMessage(ana, { text: 'hello from ana', author: 'ana' });
    await send(bo, 'hello back from bo');
    await waitForMessage(ana, { text: 'hello back from bo', author: 'bo' });
    await waitForMessage(bo, { text: 'hello back from bo', author: 'bo' });

    // cy's own message arriving proves its socket delivers; nothing else may.
    await send(cy, 'only in the other room');
    await waitForMessage(cy, { text: 'only in the other room', author: 'cy' });
    assert.deepEqual(await readMessages(cy), [{ author: 'cy', text: 'only in the other room' }]);
    const pair = [
      { author: 'ana', text: 'hello from ana' },
      { author: 'bo', text: 'hello back from bo' },
    ];
    assert.deepEqual(await readMessages(ana), pair);
    assert.deepEqual(await readMessages(bo), pair);
  });

  chatTest(label('inputs are labelled, the list is announced, sending works from the keyboard'), browser, async (h) => {
    const server = await h.server();
    const page = await h.open(server, client, inRoom(uniqueRoom('a11y')));
    for (const id of ['name-input', 'message-input']) {
      const name = await hook(page, id).evaluate((el) =>
        (el.getAttribute('aria-label') || Array.from(el.labels || [], (l) => l.textContent).join(' ')).trim());
      assert.ok(name, `${id} has no label`);
    }
    assert.equal(await hook(page, 'message-list').getAttribute('aria-live'), 'polite');
    assert.match((await hook(page, 'status').textContent()).trim(), /\S/, 'status has readable text');

    await waitForStatus(page, 'live');
    await hook(page, 'name-input').focus();
    await page.keyboard.type('kay');
    await page.keyboard.press('Tab');
    const focused = await page.evaluate(() => document.activeElement?.dataset.testid);
    assert.equal(focused, 'message-input', 'Tab from the name goes to the message field');
    await page.keyboard.type('typed, never clicked');
    await page.keyboard.press('Enter');
    await waitForMessage(page, { text: 'typed, never clicked', author: 'kay' });
    assert.equal(await hook(page, 'message-input').inputValue(), '', 'the field is cleared after sending');
  });

  chatTest(label('hostile text and author are shown literally and run nothing'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('xss');
    const sender = await h.open(server, client, { ...inRoom(room), label: 'sender' });
    const reader = await h.open(server, client, { ...inRoom(room), label: 'reader' });
    await setName(sender, HOSTILE_AUTHOR);
    await waitForStatus(sender, 'live');
    await waitForStatus(reader, 'live');
    for (const text of HOSTILE_TEXTS) {
      await send(sender, text);
      await waitForMessage(reader, { text, author: HOSTILE_AUTHOR });
    }
    const history = await h.open(server, client, { ...inRoom(room), label: 'history' });

    const expected = HOSTILE_TEXTS.map((text) => ({ author: HOSTILE_AUTHOR, text }));
    for (const page of [sender, reader, history]) {
      for (const text of HOSTILE_TEXTS) await waitForMessage(page, { text, author: HOSTILE_AUTHOR });
      assert.deepEqual(await readMessages(page), expected);
      const injected = await hook(page, 'message-list').evaluate((list) =>
        list.querySelectorAll('script, img, a, b, svg, iframe, object, embed').length);
      assert.equal(injected, 0, 'message data became elements');
      assert.equal(await page.evaluate(() => window.__pwned), undefined, 'injected code ran');
    }
  });

  chatTest(label('a reload keeps the name and shows the history once'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('reload');
    const page = await h.open(server, client, inRoom(room));
    await setName(page, 'rita');
    await waitForStatus(page, 'live');
    await send(page, 'remember me');
    await waitForMessage(page, { text: 'remember me', author: 'rita' });
    await send(page, 'and me');
    await waitForMessage(page, { text: 'and me', author: 'rita' });

    await page.reload();
    await client.ready(page);
    await waitForStatus(page, 'live');
    assert.equal(await hook(page, 'name-input').inputValue(), 'rita');
    await waitForMessage(page, { text: 'and me', author: 'rita' });
    assert.deepEqual(await readMessages(page), [
      { author: 'rita', text: 'remember me' },
      { author: 'rita', text: 'and me' },
    ]);

    // A new visitor (fresh storage) sees the history but not rita's name.
    const stranger = await h.open(server, client, inRoom(room));
    await waitForMessage(stranger, { text: 'and me', author: 'rita' });
    assert.equal(await hook(stranger, 'name-input').inputValue(), '');
  });

  chatTest(label('Shift+Enter makes a new line, Enter sends it, and it arrives with its newline'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('lines');
    const writer = await h.open(server, client, inRoom(room));
    const reader = await h.open(server, client, inRoom(room));
    await setName(writer, 'poet');
    await waitForStatus(writer, 'live');
    await waitForStatus(reader, 'live');

    const box = hook(writer, 'message-input');
    await box.click();
    await box.pressSequentially('line one');
    await box.press('Shift+Enter');
    await box.pressSequentially('line two');
    assert.equal(await box.inputValue(), 'line one\nline two', 'Shift+Enter must not send');
    assert.equal(await countMessages(writer, 'line one\nline two'), 0);
    await box.press('Enter');

    const text = 'line one\nline two';
    await waitForMessage(reader, { text, author: 'poet' });
    await waitForMessage(writer, { text, author: 'poet' });
    assert.equal(await box.inputValue(), '');
    // innerText follows the CSS: it keeps the line break only if it is rendered.
    const rendered = await messageWithText(reader, text).locator('[data-testid="text"]').evaluate((el) => el.innerText);
    assert.equal(rendered, text);
  });

  chatTest(label('a message shows at once as "sending…" and once when the server accepts it'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('optimistic');
    let release;
    const held = new Promise((resolve) => { release = resolve; });
    const writer = await h.open(server, client, {
      ...inRoom(room),
      setup: (page) => page.route('**/api/messages', async (route) => {
        if (route.request().method() === 'POST') await held;
        await route.continue();
      }),
    });
    const reader = await h.open(server, client, inRoom(room));
    await setName(writer, 'opti');
    await setName(reader, 'rhea');
    await waitForStatus(writer, 'live');
    await waitForStatus(reader, 'live');

    const text = 'shown before the server answers';
    await send(writer, text);
    const mine = messageWithText(writer, text);
    await mine.getByText(/sending/i).waitFor();
    assert.equal(await countMessages(writer, text), 1);
    assert.equal(await countMessages(reader, text), 0, 'the server cannot have it yet');

    release();
    await waitForMessage(reader, { text, author: 'opti' });
    await mine.getByText(/sending/i).waitFor({ state: 'hidden' });
    await waitForMessage(writer, { text, author: 'opti' }, { count: 1 });
    // One more message through the same socket: had a duplicate been coming, it came first.
    await send(reader, 'after it');
    await waitForMessage(writer, { text: 'after it' });
    assert.equal(await countMessages(writer, text), 1);
  });

  chatTest(label('a failed send stays as "not sent"; Retry delivers it once with the same client_id'), browser, async (h) => {
    h.expectConsole(STATUS_503, /status of 400/);
    const server = await h.server();
    const room = uniqueRoom('retry');
    const posted = [];
    let outage = true;
    const writer = await h.open(server, client, {
      ...inRoom(room),
      setup: async (page) => {
        page.on('request', (req) => {
          if (req.method() === 'POST' && new URL(req.url()).pathname === '/api/messages') posted.push(req.postDataJSON());
        });
        await page.route('**/api/messages', (route) => {
          if (!outage || route.request().method() !== 'POST') return route.continue();
          const text = route.request().postDataJSON().text;
          if (text.startsWith('refused')) {
            return route.fulfill({
              status: 400,
              contentType: 'application/json',
              body: JSON.stringify({ error: 'That message breaks a rule the test made up.', field: 'text' }),
            });
          }
          return route.fulfill({
            status: 503,
            headers: { 'Retry-After': '0' },
            contentType: 'application/json',
            body: JSON.stringify({ error: 'The message stream is unavailable; try again shortly.' }),
          });
        });
      },
    });
    const reader = await h.open(server, client, inRoom(room));
    await setName(writer, 'wren');
    await setName(reader, 'rhea');
    await waitForStatus(writer, 'live');
    await waitForStatus(reader, 'live');

    const text = 'through the outage';
    await send(writer, text);
    const mine = messageWithText(writer, text);
    await mine.getByText(/not sent/i).waitFor({ timeout: 20_000 });
    assert.ok(posted.length >= 2, `503 should be retried automatically (posted ${posted.length}×)`);
    const ids = new Set(posted.map((p) => p.client_id));
    assert.equal(ids.size, 1, 'every retry carries the same client_id');
    const [clientId] = ids;
    assert.match(clientId, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.deepEqual(posted[0], { room, author: 'wren', text, client_id: clientId });
    await mine.getByText('The message stream is unavailable; try again shortly.').waitFor();

    // A 4xx is not retried, and the server's sentence is shown.
    const before = posted.length;
    await send(writer, 'refused by the server');
    await writer.getByText('That message breaks a rule the test made up.').first().waitFor();
    await messageWithText(writer, 'refused by the server').getByText(/not sent/i).waitFor();
    assert.equal(posted.length, before + 1, 'a 400 is not retried automatically');

    outage = false;
    await mine.getByRole('button', { name: /retry/i }).click();
    await waitForMessage(reader, { text, author: 'wren' });
    await mine.getByText(/not sent/i).waitFor({ state: 'hidden' });
    assert.equal(posted.at(-1).client_id, clientId, 'Retry reuses the client_id');
    await send(reader, 'marker after the retry');
    await waitForMessage(writer, { text: 'marker after the retry' });
    assert.equal(await countMessages(writer, text), 1);
    assert.equal(await countMessages(reader, text), 1);
    assert.equal(await countMessages(reader, 'refused by the server'), 0);
  });

  chatTest(label('a message the server took but whose answer was lost is shown once, not as failed'), browser, async (h) => {
    h.expectConsole(STATUS_503);
    const server = await h.server();
    const room = uniqueRoom('lostanswer');
    let posts = 0;
    const writer = await h.open(server, client, {
      ...inRoom(room),
      setup: (page) => page.route('**/api/messages', async (route) => {
        if (route.request().method() !== 'POST') return route.continue();
        posts += 1;
        const real = await route.fetch(); // the server does accept it (or answers 200 to a repeat)
        assert.ok([200, 201].includes(real.status()), `server answered ${real.status()}`);
        await route.fulfill({ status: 503, headers: { 'Retry-After': '1' }, contentType: 'application/json', body: '{"error":"lost"}' });
      }),
    });
    const reader = await h.open(server, client, inRoom(room));
    await setName(writer, 'lou');
    await setName(reader, 'rhea');
    await waitForStatus(writer, 'live');
    await waitForStatus(reader, 'live');

    const text = 'accepted, answer lost';
    await send(writer, text);
    await waitForMessage(reader, { text, author: 'lou' });
    const mine = messageWithText(writer, text);
    await mine.getByText(/sending/i).waitFor({ state: 'hidden' });
    await send(reader, 'marker');
    await waitForMessage(writer, { text: 'marker' });
    assert.equal(await countMessages(writer, text), 1);
    assert.equal(await countMessages(reader, text), 1);
    assert.equal(await mine.getByText(/not sent/i).count(), 0);
    assert.ok(posts >= 1);
  });

  chatTest(label('server killed and restarted on the same port: reconnecting, then live; Retry delivers'), browser, async (h) => {
    h.expectConsole(REFUSED);
    const first = await h.server();
    const room = uniqueRoom('restart');
    const page = await h.open(first, client, inRoom(room));
    await setName(page, 'phoenix');
    await waitForStatus(page, 'live');
    await send(page, 'before the crash');
    await waitForMessage(page, { text: 'before the crash', author: 'phoenix' });

    await first.kill();
    await waitForStatus(page, 'reconnecting');
    const text = 'sent while the server was down';
    await send(page, text);
    const mine = messageWithText(page, text);
    await mine.getByText(/not sent/i).waitFor({ timeout: 30_000 });

    const second = await h.server({ listen: first.listen });
    assert.equal(second.port, first.port);
    await waitForStatus(page, 'live', 30_000); // the backoff may be at several seconds by now
    await mine.getByRole('button', { name: /retry/i }).click();
    await mine.getByText(/not sent|sending/i).waitFor({ state: 'hidden' });

    const witness = await h.open(second, client, inRoom(room));
    await setName(witness, 'wit');
    await waitForMessage(witness, { text, author: 'phoenix' });
    await send(witness, 'witness marker');
    await waitForMessage(page, { text: 'witness marker' });
    assert.equal(await countMessages(page, text), 1);
    const shown = (await readMessages(page)).map((m) => m.text);
    assert.equal(new Set(shown).size, shown.length, `duplicates on screen: ${JSON.stringify(shown)}`);
  });

  chatTest(label('reconnects after 4008 and 1001 resume from the last cursor; reset replaces the list'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('resume');
    let socket;
    const page = await h.open(server, client, {
      ...inRoom(room),
      setup: async (p) => { socket = await scriptedSocket(p); },
    });
    const msg = (text) => ({ id: randomUUID(), room, author: 'script', text, sent_at: new Date().toISOString() });
    const texts = async () => (await readMessages(page)).map((m) => m.text);
    const [one, two, three, four] = ['one', 'two', 'three', 'four'].map(msg);

    const c0 = await socket.connection(0);
    const u0 = new URL(c0.url());
    assert.equal(u0.pathname, '/ws');
    assert.equal(u0.searchParams.get('room'), room);
    assert.equal(u0.searchParams.get('since'), null, 'a first visit asks for history');
    assert.equal(await hook(page, 'status').getAttribute('data-state'), 'connecting');
    c0.send(frames.message('c1', one));
    c0.send(frames.message('c2', two));
    c0.send(frames.ready('c2'));
    await waitForStatus(page, 'live');
    assert.deepEqual(await texts(), ['one', 'two']);

    c0.close({ code: 4008, reason: 'slow consumer' });
    await waitForStatus(page, 'reconnecting');
    const c1 = await socket.connection(1);
    assert.equal(new URL(c1.url()).searchParams.get('since'), 'c2');
    assert.equal(new URL(c1.url()).searchParams.get('room'), room);
    c1.send(frames.message('c2', two)); // a replayed duplicate
    c1.send(JSON.stringify({ type: 'from-the-future', cursor: 'x' })); // unknown frames are ignored
    c1.send(frames.message('c3', three));
    c1.send(frames.ready('c3'));
    await waitForStatus(page, 'live');
    assert.deepEqual(await texts(), ['one', 'two', 'three']);

    c1.close({ code: 1001, reason: 'going away' });
    await waitForStatus(page, 'reconnecting');
    const c2 = await socket.connection(2);
    assert.equal(new URL(c2.url()).searchParams.get('since'), 'c3');
    c2.send(frames.reset('cursor too old'));
    c2.send(frames.message('c9', four));
    c2.send(frames.ready('c9'));
    await waitForStatus(page, 'live');
    assert.deepEqual(await texts(), ['four']);

    c2.close({ code: 4008, reason: 'slow consumer' });
    const c3 = await socket.connection(3);
    assert.equal(new URL(c3.url()).searchParams.get('since'), 'c9', 'the cursor after a reset is the new one');
    c3.send(frames.ready('c9'));
    await waitForStatus(page, 'live');
    assert.deepEqual(await texts(), ['four']);
  });

  chatTest(label('the list follows new messages, unless the reader scrolled up'), browser, async (h) => {
    const server = await h.server();
    const room = uniqueRoom('scroll');
    for (let i = 0; i < 30; i += 1) {
      await postMessage(server, { room, author: 'filler', text: `filler ${i}\nsecond line` });
    }
    const page = await h.open(server, client, inRoom(room));
    await waitForStatus(page, 'live');
    await waitForMessage(page, { text: 'filler 29\nsecond line' });
    const atBottom = async () => {
      const { top, max } = await listScroll(page);
      return max - top <= 4;
    };
    assert.ok((await listScroll(page)).max > 200, 'the list should overflow for this test to mean anything');
    await waitUntil(atBottom, 'the list starts at the newest message');

    await listScroll(page, 'top');
    await postMessage(server, { room, author: 'filler', text: 'while scrolled up' });
    await waitForMessage(page, { text: 'while scrolled up' });
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    assert.equal((await listScroll(page)).top, 0, 'the reader was pulled away from what they were reading');

    await listScroll(page, 'bottom');
    await postMessage(server, { room, author: 'filler', text: 'while at the bottom' });
    await waitForMessage(page, { text: 'while at the bottom' });
    await waitUntil(atBottom, 'the list follows the newest message');
  });

  for (const [name, viewport] of Object.entries(VIEWPORTS)) {
    chatTest(label(`looks right on ${name} (${viewport.width}×${viewport.height}); screenshot saved`), browser, async (h) => {
      h.expectConsole(STATUS_503);
      const server = await h.server();
      const room = uniqueRoom('look');
      for (const text of [
        'Welcome to the room. This is a fairly long message that should wrap nicely onto more than one line on a narrow phone screen.',
        'Multi-line:\n  - indented item\n  - another\n\tand a tab',
        'https://example.com/a/really/long/url/without/any/spaces/that/must/not/widen/the/page/0123456789abcdefghijklmnopqrstuvwxyz',
        'مرحبا بالعالم — right-to-left text',
        '😀😃😄😁 emoji and combining: é (e + ́)',
      ]) {
        await postMessage(server, { room, author: 'Zoë from the far side of a long name', text });
      }
      let failing = false;
      const page = await h.open(server, client, {
        ...inRoom(room),
        viewport,
        setup: (p) => p.route('**/api/messages', (route) => (failing && route.request().method() === 'POST'
          ? route.fulfill({ status: 503, headers: { 'Retry-After': '0' }, contentType: 'application/json', body: '{"error":"The message stream is unavailable; try again shortly."}' })
          : route.continue())),
      });
      await setName(page, 'me');
      await waitForStatus(page, 'live');
      await send(page, HOSTILE_TEXTS[0]);
      await waitForMessage(page, { text: HOSTILE_TEXTS[0], author: 'me' });
      failing = true;
      await send(page, 'this one could not be sent');
      await messageWithText(page, 'this one could not be sent').getByText(/not sent/i).waitFor({ timeout: 20_000 });
      await hook(page, 'message-input').fill('a draft in progress');

      const file = await screenshot(page, `${client.name}-${name}`);
      assert.ok(file.endsWith('.png'));
      const layout = await page.evaluate(() => ({
        scrollWidth: document.documentElement.scrollWidth,
        innerWidth: window.innerWidth,
      }));
      assert.ok(layout.scrollWidth <= layout.innerWidth, `the page scrolls sideways: ${JSON.stringify(layout)}`);
      for (const id of ['name-input', 'message-input', 'send-button', 'status', 'room']) {
        const box = await hook(page, id).boundingBox();
        assert.ok(box, `${id} is not visible`);
        assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= viewport.width + 1 && box.y + box.height <= viewport.height + 1,
          `${id} is outside the ${name} viewport: ${JSON.stringify(box)}`);
      }
      const button = await hook(page, 'send-button').boundingBox();
      assert.ok(button.height >= 32 && button.width >= 44, 'the send button is big enough to tap');
    });
  }
}

/** Polls `check` (async, returns boolean) until true; bounded by WAIT_MS. */
async function waitUntil(check, what, timeout = WAIT_MS) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
