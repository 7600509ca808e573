// The Leptos client against two kinesis-chat instances that share one
// kinesis-mock stream (issue #4, tests 2 and 4): browsers on different
// instances talk both ways; a browser whose instance is killed shows
// `reconnecting`, comes back `live` when the instance restarts, and gets
// what was said meanwhile on the other instance once, in order.
import assert from 'node:assert/strict';
import { after, before } from 'node:test';
import { failOnHydrationWarnings, requireSite, startKinesisMock } from './leptos-support.mjs';
import {
  CLIENTS, chatTest, readMessages, send, setName, uniqueRoom, useBrowser, waitForMessage, waitForStatus,
} from './support.mjs';

const REFUSED = /net::ERR_CONNECTION_REFUSED|net::ERR_CONNECTION_RESET|net::ERR_EMPTY_RESPONSE/;
// A cross-instance message travels POST → stream → the other instance's
// poll (200 ms) on a slow emulator.
const CROSS_MS = 20_000;

requireSite();
const browser = useBrowser();
const { leptos, plain } = CLIENTS;
let kinesis;
before(async () => { kinesis = await startKinesisMock({ shards: 2 }); });
after(async () => { await kinesis?.stop(); });

chatTest('[leptos/kinesis] browsers on two instances of one stream exchange messages both ways', browser, async (h) => {
  const one = await h.server(kinesis.serverOptions);
  const two = await h.server(kinesis.serverOptions);
  const room = uniqueRoom('kin');
  const a = await h.open(one, leptos, { query: `?room=${room}`, label: 'a@one' });
  const b = await h.open(two, leptos, { query: `?room=${room}`, label: 'b@two' });
  const c = await h.open(two, plain, { query: `?room=${room}`, label: 'c@two (plain)' });
  failOnHydrationWarnings(h, a);
  await setName(a, 'ada');
  await setName(b, 'bob');
  await setName(c, 'cat');
  for (const p of [a, b, c]) await waitForStatus(p, 'live');

  await send(a, 'from instance one');
  await waitForMessage(b, { text: 'from instance one', author: 'ada' }, { timeout: CROSS_MS });
  await waitForMessage(c, { text: 'from instance one', author: 'ada' }, { timeout: CROSS_MS });
  await send(b, 'from instance two');
  await waitForMessage(a, { text: 'from instance two', author: 'bob' }, { timeout: CROSS_MS });
  await send(c, 'plain on two');
  await waitForMessage(a, { text: 'plain on two', author: 'cat' }, { timeout: CROSS_MS });
  await waitForMessage(b, { text: 'plain on two', author: 'cat' }, { timeout: CROSS_MS });

  const expected = [
    { author: 'ada', text: 'from instance one' },
    { author: 'bob', text: 'from instance two' },
    { author: 'cat', text: 'plain on two' },
  ];
  for (const p of [a, b, c]) assert.deepEqual(await readMessages(p), expected);
}, { timeout: 120_000 });

chatTest('[leptos/kinesis] kill the instance a browser is on and restart it: reconnecting, live, and what was said meanwhile arrives once, in order', browser, async (h) => {
  h.expectConsole(REFUSED);
  const one = await h.server(kinesis.serverOptions);
  const two = await h.server(kinesis.serverOptions);
  const room = uniqueRoom('kill');
  const victim = await h.open(one, leptos, { query: `?room=${room}`, label: 'victim@one' });
  const talker = await h.open(two, leptos, { query: `?room=${room}`, label: 'talker@two' });
  await setName(victim, 'vic');
  await setName(talker, 'tal');
  await waitForStatus(victim, 'live');
  await waitForStatus(talker, 'live');
  await send(talker, 'before the kill');
  await waitForMessage(victim, { text: 'before the kill', author: 'tal' }, { timeout: CROSS_MS });

  await one.kill();
  await waitForStatus(victim, 'reconnecting');
  const meanwhile = ['while one was down 1', 'while one was down 2', 'while one was down 3'];
  for (const text of meanwhile) {
    await send(talker, text);
    await waitForMessage(talker, { text, author: 'tal' }, { timeout: CROSS_MS });
  }

  const again = await h.server({ ...kinesis.serverOptions, listen: one.listen });
  assert.equal(again.port, one.port);
  await waitForStatus(victim, 'live', 40_000);
  for (const text of meanwhile) await waitForMessage(victim, { text, author: 'tal' }, { timeout: CROSS_MS });
  await send(victim, 'back from the dead');
  await waitForMessage(talker, { text: 'back from the dead', author: 'vic' }, { timeout: CROSS_MS });
  await waitForMessage(victim, { text: 'back from the dead', author: 'vic' }, { timeout: CROSS_MS });

  const texts = (await readMessages(victim)).map((m) => m.text);
  assert.deepEqual(texts, ['before the kill', ...meanwhile, 'back from the dead']);
}, { timeout: 150_000 });
