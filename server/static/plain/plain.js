// kinesis-chat: the plain fallback client. No framework, no build step.
//
// It speaks ../../PROTOCOL.md (shared/PROTOCOL.md): a message is sent with
// `fetch` POST /api/messages and every message (ours included) arrives on the
// WebSocket /ws?room=..&since=.., which this page only listens on.
//
// Rules this file keeps:
// - Message data reaches the page only through textContent / text nodes.
// - A message id is shown at most once (the `seen` set), whether it came from
//   the history, the live feed, a replay after reconnecting, or our own POST.
// - The last cursor seen is what a reconnect resumes from, so nothing is
//   missed and nothing repeats; `reset` drops the list and takes the history.
// - A message we send is shown at once ("sending…"), keeps its client_id for
//   every retry, and becomes the real message when its 201 or its echo
//   arrives (id == client_id). If it cannot be sent it stays as "not sent".
'use strict';

(() => {
  // Limits from PROTOCOL.md, counted in Unicode characters after trimming.
  const MAX_AUTHOR_CHARS = 40;
  const MAX_TEXT_CHARS = 4000;
  const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const DEFAULT_ROOM = 'lobby';
  const NAME_KEY = 'kinesis-chat.author';

  // Reconnect: 0.5 s doubling to 15 s, with jitter so a restarted server is
  // not hit by every browser in the same instant.
  const RECONNECT_BASE_MS = 500;
  const RECONNECT_MAX_MS = 15000;
  // A socket that neither opens nor fails in this time is abandoned.
  const CONNECT_TIMEOUT_MS = 10000;
  // One POST may take this long (the server answers only once the stream
  // has the record); after that the same client_id is tried again.
  const SEND_TIMEOUT_MS = 20000;
  // Automatic retries on 503/429/5xx/network errors before "not sent".
  const AUTO_RETRIES = 3;
  const SEND_RETRY_BASE_MS = 500;
  // A Retry-After longer than this is cut short; the person can still retry.
  const RETRY_AFTER_MAX_MS = 30000;
  // Messages kept on screen, and ids remembered for de-duplication.
  const MAX_SHOWN = 1000;
  const MAX_SEEN = 5000;
  // Closer than this to the bottom counts as "at the bottom": keep following.
  const NEAR_BOTTOM_PX = 48;

  const $ = (id) => document.getElementById(id);
  const ui = {
    room: $('room'),
    status: $('status'),
    notice: $('notice'),
    scroller: $('scroller'),
    list: $('messages'),
    jump: $('jump'),
    form: $('composer'),
    name: $('name'),
    text: $('text'),
    formError: $('form-error'),
  };

  const STATUS_TEXT = {
    connecting: 'Connecting…',
    live: 'Live',
    reconnecting: 'Reconnecting…',
    offline: 'Offline',
  };

  // ---- state -------------------------------------------------------------

  const room = pickRoom();
  /** Last cursor seen on the socket; a reconnect resumes after it. */
  let cursor = null;
  /** Ids already on screen (insertion-ordered, bounded). */
  const seen = new Set();
  /** Our own messages not yet confirmed by the socket, by id (= client_id). */
  const outbox = new Map();
  /** The current socket; events from older sockets are ignored. */
  let socket = null;
  /** Failed connection attempts since the last `ready`. */
  let attempt = 0;
  let reconnectTimer = null;
  let leaving = false;
  /** Per message element: its author, time, note, text and actions parts. */
  const parts = new WeakMap();

  // ---- small helpers -----------------------------------------------------

  function h(tag, className) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    return el;
  }

  const chars = (s) => Array.from(s).length;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const jitter = (ms) => ms / 2 + Math.random() * (ms / 2);

  function newId() {
    if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    // randomUUID needs a secure context; plain http on a LAN address is not.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const hex = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function isMessage(m) {
    return !!m && typeof m === 'object' &&
      ['id', 'room', 'author', 'text', 'sent_at'].every((k) => typeof m[k] === 'string');
  }

  function storage(fn, fallback) {
    try { return fn(window.localStorage); } catch { return fallback; } // private mode, disabled storage
  }

  function pickRoom() {
    const asked = new URLSearchParams(location.search).get('room');
    if (asked === null || asked.trim() === '') return DEFAULT_ROOM;
    const candidate = asked.trim().toLowerCase();
    if (ROOM_RE.test(candidate)) return candidate;
    showNotice(`“${asked}” is not a room name (use up to 64 lowercase letters, digits, “-” and “_”). You are in #${DEFAULT_ROOM}.`);
    return DEFAULT_ROOM;
  }

  function showNotice(sentence) {
    ui.notice.textContent = sentence;
    ui.notice.hidden = false;
  }

  function showFormError(sentence) {
    ui.formError.textContent = sentence;
    ui.formError.hidden = false;
  }

  function clearFormError() {
    ui.formError.textContent = '';
    ui.formError.hidden = true;
  }

  function setStatus(state) {
    if (ui.status.dataset.state === state) return;
    ui.status.dataset.state = state;
    ui.status.textContent = STATUS_TEXT[state];
  }

  // ---- time --------------------------------------------------------------

  const fmtTime = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
  const fmtDay = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  const fmtFull = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });

  function setTime(el, iso) {
    const d = iso ? new Date(iso) : null;
    if (!d || Number.isNaN(d.getTime())) {
      el.textContent = '';
      el.removeAttribute('datetime');
      el.removeAttribute('title');
      return;
    }
    el.dateTime = iso;
    el.textContent = d.toDateString() === new Date().toDateString() ? fmtTime.format(d) : fmtDay.format(d);
    el.title = fmtFull.format(d);
  }

  // ---- rendering ---------------------------------------------------------

  function messageElement() {
    const li = h('li', 'msg');
    li.dataset.testid = 'message';
    const meta = h('div', 'meta');
    const author = h('span', 'author');
    author.dataset.testid = 'author';
    author.dir = 'auto'; // isolates right-to-left names from the time beside them
    const time = h('time', 'time');
    const note = h('span', 'note');
    meta.append(author, ' ', time, ' ', note);
    const text = h('p', 'text');
    text.dataset.testid = 'text';
    text.dir = 'auto';
    const problem = h('p', 'problem');
    problem.hidden = true;
    const actions = h('div', 'actions');
    actions.hidden = true;
    li.append(meta, text, problem, actions);
    parts.set(li, { author, time, note, text, problem, actions });
    return li;
  }

  function fill(li, m) {
    const p = parts.get(li);
    li.dataset.id = m.id;
    p.author.textContent = m.author;
    p.text.textContent = m.text;
    setTime(p.time, m.sent_at);
  }

  /** Shows an outbox entry in its current state. */
  function renderOutgoing(entry) {
    const li = entry.el;
    const p = parts.get(li);
    // Its note, problem and buttons change its height: keep following if we were.
    const follow = li.parentNode === ui.list && atBottom();
    fill(li, entry.message || { ...entry.body, id: entry.id, sent_at: '' });
    li.dataset.state = entry.state;
    li.classList.toggle('failed', entry.state === 'failed');
    li.classList.toggle('sending', entry.state === 'sending');
    p.actions.replaceChildren();
    p.actions.hidden = true;
    p.problem.hidden = !entry.problem;
    p.problem.textContent = entry.problem || '';
    if (entry.state === 'sending') {
      p.note.textContent = entry.tries > 0 ? 'sending… (trying again)' : 'sending…';
    } else if (entry.state === 'failed') {
      p.note.textContent = 'not sent — retry';
      const retry = h('button', 'retry');
      retry.type = 'button';
      retry.textContent = 'Retry';
      retry.addEventListener('click', () => {
        ui.text.focus();
        deliver(entry);
      });
      const discard = h('button', 'discard');
      discard.type = 'button';
      discard.textContent = 'Discard';
      discard.addEventListener('click', () => {
        outbox.delete(entry.id);
        entry.el.remove();
        ui.text.focus();
      });
      p.actions.append(retry, discard);
      p.actions.hidden = false;
    } else {
      p.note.textContent = ''; // accepted; waiting only for its place in the stream
    }
    if (follow) toBottom();
  }

  function confirmedElement(li) {
    const p = parts.get(li);
    li.dataset.state = 'shown';
    li.classList.remove('failed', 'sending');
    p.note.textContent = '';
    p.problem.hidden = true;
    p.problem.textContent = '';
    p.actions.replaceChildren();
    p.actions.hidden = true;
  }

  /** The first of our not-yet-confirmed messages: the stream's messages go above it. */
  function firstOutgoing() {
    for (const entry of outbox.values()) {
      if (entry.el.parentNode === ui.list) {
        // outbox is insertion-ordered, and entries are appended in that order
        return entry.el;
      }
    }
    return null;
  }

  // ---- scrolling ---------------------------------------------------------

  function atBottom() {
    const s = ui.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight <= NEAR_BOTTOM_PX;
  }

  function toBottom() {
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
    ui.jump.hidden = true;
  }

  ui.scroller.addEventListener('scroll', () => {
    if (atBottom()) ui.jump.hidden = true;
  }, { passive: true });
  ui.jump.addEventListener('click', () => {
    toBottom();
    ui.text.focus();
  });

  // ---- the stream's messages ----------------------------------------------

  function remember(id) {
    seen.add(id);
    if (seen.size > MAX_SEEN) seen.delete(seen.values().next().value);
  }

  function receive(m) {
    if (!isMessage(m)) {
      console.warn('kinesis-chat: ignoring a malformed message frame');
      return;
    }
    if (m.room !== room || seen.has(m.id)) return;
    remember(m.id);
    const follow = atBottom();
    const mine = outbox.get(m.id);
    let li;
    if (mine) {
      outbox.delete(m.id);
      li = mine.el;
    } else {
      li = messageElement();
    }
    fill(li, m);
    confirmedElement(li);
    ui.list.insertBefore(li, firstOutgoing());
    trim();
    if (follow || mine) toBottom();
    else ui.jump.hidden = false;
  }

  function trim() {
    let extra = ui.list.childElementCount - outbox.size - MAX_SHOWN;
    while (extra-- > 0 && ui.list.firstElementChild) ui.list.firstElementChild.remove();
  }

  function reset() {
    // Our own unconfirmed messages stay; the history that follows merges them.
    for (const li of Array.from(ui.list.children)) {
      if (!outbox.has(li.dataset.id)) li.remove();
    }
    seen.clear();
    cursor = null;
  }

  // ---- the socket ----------------------------------------------------------

  function socketUrl() {
    const url = new URL('/ws', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('room', room);
    if (cursor) url.searchParams.set('since', cursor);
    return url.href;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (leaving || socket) return;
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch {
      scheduleReconnect();
      return;
    }
    socket = ws;
    const openTimer = setTimeout(() => {
      if (socket === ws && ws.readyState === WebSocket.CONNECTING) ws.close();
    }, CONNECT_TIMEOUT_MS);
    ws.addEventListener('open', () => clearTimeout(openTimer));
    ws.addEventListener('message', (ev) => {
      if (socket === ws) {
        lastFrameAt = Date.now();
        onFrame(ev.data);
      }
    });
    ws.addEventListener('close', () => {
      clearTimeout(openTimer);
      if (socket !== ws) return;
      socket = null;
      // 4008 (too slow), 1001 (server going away), a dropped network: all
      // resume from the last cursor after a short, growing, jittered wait.
      if (!leaving) scheduleReconnect();
    });
  }

  // Browsers cannot see WebSocket pings. Once two heartbeats have shown
  // the interval, 2.5 intervals of silence mean the socket is dead: drop it
  // and reconnect from the last cursor, without waiting for TCP to notice.
  let lastFrameAt = 0;
  let lastHeartbeatAt = 0;
  let heartbeatEveryMs = 0;
  setInterval(() => {
    const ws = socket;
    if (!ws || ws.readyState !== WebSocket.OPEN || !heartbeatEveryMs) return;
    if (Date.now() - lastFrameAt > 2.5 * heartbeatEveryMs) {
      socket = null;
      lastHeartbeatAt = 0;
      heartbeatEveryMs = 0;
      ws.close();
      scheduleReconnect();
    }
  }, 1000);

  function scheduleReconnect() {
    const ceiling = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** attempt);
    attempt = Math.min(attempt + 1, 16);
    setStatus(navigator.onLine === false ? 'offline' : 'reconnecting');
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, jitter(ceiling));
  }

  function reconnectNow() {
    if (!socket && reconnectTimer && !leaving) connect();
  }

  function onFrame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      console.warn('kinesis-chat: ignoring a frame that is not JSON');
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    switch (frame.type) {
      case 'message':
        if (typeof frame.cursor === 'string' && frame.cursor) cursor = frame.cursor;
        receive(frame.message);
        break;
      case 'ready':
        if (typeof frame.cursor === 'string' && frame.cursor) cursor = frame.cursor;
        attempt = 0;
        setStatus('live');
        break;
      case 'reset':
        reset();
        break;
      case 'heartbeat': {
        // The server sends one per ping interval; learn the interval so
        // silence can tell a dead socket from a quiet room.
        const now = Date.now();
        if (lastHeartbeatAt) heartbeatEveryMs = Math.max(1000, now - lastHeartbeatAt);
        lastHeartbeatAt = now;
        break;
      }
      default:
        // A newer server may add frame types; this client ignores them.
        break;
    }
  }

  window.addEventListener('online', reconnectNow);
  window.addEventListener('offline', () => {
    if (!socket) setStatus('offline');
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') reconnectNow();
  });
  window.addEventListener('pagehide', () => {
    leaving = true;
    clearTimeout(reconnectTimer);
    const ws = socket;
    socket = null;
    if (ws) ws.close(1000);
  });
  window.addEventListener('pageshow', (ev) => {
    if (!ev.persisted) return; // restored from the back/forward cache
    leaving = false;
    setStatus('reconnecting');
    connect();
  });

  // ---- sending -------------------------------------------------------------

  function checkAuthor(author) {
    if (!author) return 'Please enter your name.';
    if (/[\u0000-\u001f\u007f-\u009f]/.test(author)) return 'Name must not contain control characters.';
    const n = chars(author);
    if (n > MAX_AUTHOR_CHARS) return `Name must be at most ${MAX_AUTHOR_CHARS} characters (it has ${n}).`;
    return null;
  }

  function checkText(text) {
    if (/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/.test(text)) {
      return 'Message must not contain control characters other than newline and tab.';
    }
    const n = chars(text);
    if (n > MAX_TEXT_CHARS) return `Message must be at most ${MAX_TEXT_CHARS} characters (it has ${n}).`;
    return null;
  }

  function retryAfterMs(header) {
    if (!header) return null;
    let ms = /^\s*\d+\s*$/.test(header) ? Number(header) * 1000 : Date.parse(header) - Date.now();
    if (!Number.isFinite(ms)) return null;
    return Math.min(Math.max(ms, 0), RETRY_AFTER_MAX_MS);
  }

  /** One POST. Resolves to {ok, message} or {ok: false, retryable, problem, waitMs}. */
  async function postOnce(body) {
    let res;
    try {
      res = await fetch('/api/messages', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify(body),
        cache: 'no-store',
        signal: typeof AbortSignal.timeout === 'function' ? AbortSignal.timeout(SEND_TIMEOUT_MS) : undefined,
      });
    } catch {
      return {
        ok: false,
        retryable: true,
        problem: navigator.onLine === false ? 'You are offline.' : 'Could not reach the server.',
        waitMs: null,
      };
    }
    let payload = null;
    try {
      payload = await res.json();
    } catch {
      // not JSON (a proxy's error page, say): the status speaks for itself
    }
    if (res.status === 200 || res.status === 201) {
      return { ok: true, message: payload && isMessage(payload.message) ? payload.message : null };
    }
    const said = payload && typeof payload.error === 'string' && payload.error.trim() ? payload.error.trim() : null;
    if (res.status === 429 || res.status >= 500) {
      return {
        ok: false,
        retryable: true,
        problem: said || `The server could not take the message just now (${res.status}).`,
        waitMs: retryAfterMs(res.headers.get('Retry-After')),
      };
    }
    return { ok: false, retryable: false, problem: said || `The server refused the message (${res.status}).`, waitMs: null };
  }

  /** Sends an outbox entry, retrying a few times; always with the same client_id. */
  async function deliver(entry) {
    if (entry.inFlight) return;
    entry.inFlight = true;
    entry.state = 'sending';
    entry.tries = 0;
    entry.problem = '';
    renderOutgoing(entry);
    try {
      for (;;) {
        const outcome = await postOnce(entry.body);
        if (!outbox.has(entry.id)) return; // its echo arrived first, or it was discarded
        if (outcome.ok) {
          entry.state = 'sent';
          if (outcome.message) entry.message = outcome.message;
          renderOutgoing(entry);
          return;
        }
        if (outcome.retryable && entry.tries < AUTO_RETRIES) {
          const wait = outcome.waitMs ?? jitter(SEND_RETRY_BASE_MS * 2 ** entry.tries);
          entry.tries += 1;
          renderOutgoing(entry);
          await sleep(wait);
          if (!outbox.has(entry.id)) return;
          continue;
        }
        entry.state = 'failed';
        entry.problem = outcome.problem;
        renderOutgoing(entry);
        if (!outcome.retryable) showFormError(outcome.problem);
        return;
      }
    } finally {
      entry.inFlight = false;
    }
  }

  function submit() {
    clearFormError();
    const author = ui.name.value.trim();
    const authorProblem = checkAuthor(author);
    if (authorProblem) {
      showFormError(authorProblem);
      ui.name.focus();
      return;
    }
    const text = ui.text.value.trim();
    if (!text) {
      ui.text.focus();
      return;
    }
    const textProblem = checkText(text);
    if (textProblem) {
      showFormError(textProblem);
      ui.text.focus();
      return;
    }
    saveName(author);
    const id = newId();
    const entry = {
      id,
      body: { room, author, text, client_id: id },
      el: messageElement(),
      state: 'sending',
      message: null,
      problem: '',
      tries: 0,
      inFlight: false,
    };
    entry.el.classList.add('mine');
    outbox.set(id, entry);
    renderOutgoing(entry);
    ui.list.append(entry.el);
    toBottom();
    ui.text.value = '';
    autosize();
    ui.text.focus();
    deliver(entry);
  }

  // ---- the composer --------------------------------------------------------

  function saveName(name) {
    storage((s) => s.setItem(NAME_KEY, name));
  }

  function autosize() {
    const ta = ui.text;
    ta.style.height = 'auto';
    ta.style.height = `${ta.scrollHeight + (ta.offsetHeight - ta.clientHeight)}px`;
  }

  ui.form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submit();
  });

  ui.text.addEventListener('keydown', (ev) => {
    // Enter sends; Shift+Enter is a new line; never while an IME is composing.
    if (ev.key !== 'Enter' || ev.shiftKey || ev.altKey || ev.isComposing || ev.keyCode === 229) return;
    ev.preventDefault();
    submit();
  });
  ui.text.addEventListener('input', autosize);

  ui.name.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.isComposing) {
      ev.preventDefault();
      ui.text.focus();
    }
  });
  ui.name.addEventListener('change', () => {
    const name = ui.name.value.trim();
    if (name && !checkAuthor(name)) saveName(name);
  });

  // ---- start ---------------------------------------------------------------

  ui.room.textContent = room;
  document.title = `#${room} · kinesis-chat`;
  ui.name.value = storage((s) => s.getItem(NAME_KEY), null) || '';
  setStatus('connecting');
  connect();
  (ui.name.value ? ui.text : ui.name).focus();
})();
