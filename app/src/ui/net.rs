//! The browser side of the chat page (features `hydrate` / `csr`): the
//! WebSocket, the POSTs, storage, timers, the clock and scrolling.
//!
//! - **Receiving.** One socket at a time on `/ws?room=..&since=<cursor>`.
//!   Any close (4008 slow consumer, 1001 going away, a dropped network, a
//!   socket that never opened) reconnects after an exponential, jittered
//!   wait and resumes after the last cursor, so nothing is missed or
//!   repeated. Coming back online or to a tab hidden for a while reconnects
//!   at once, since the old socket may be dead without knowing it; and if
//!   the server sends `heartbeat` frames, silence past two of them counts as
//!   a dead socket too (browsers cannot see WebSocket pings).
//! - **Sending.** `POST /api/messages` with gloo-net, with a fixed
//!   `client_id`, retried a few times on 429/5xx/network errors, then left
//!   as "not sent" for the person to retry.
//!
//! State that is not `Send` (the socket, its callbacks, timers) lives in a
//! thread-local: the page has one socket, and wasm has one thread.

use super::chat::{Chat, Delivery, FrameEffect, Status, SubmitError};
use crate::protocol::{ChatMessage, ErrorBody, PostMessage, PostResponse, ServerFrame};
use crate::validate::validate_author;
use leptos::prelude::*;
use std::cell::RefCell;
use std::time::Duration;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{CloseEvent, Event, MessageEvent, WebSocket};

/// Where the author's name is remembered across visits (same key as the
/// plain client, so switching clients keeps it).
const NAME_KEY: &str = "kinesis-chat.author";
/// First reconnect wait; doubles per failed attempt.
const RECONNECT_BASE_MS: f64 = 500.0;
/// Longest reconnect wait: a restarted server is found within this.
const RECONNECT_MAX_MS: f64 = 15_000.0;
/// A socket that neither opens nor fails in this time is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A tab hidden at least this long reconnects when shown again: a laptop
/// that slept may hold a socket that is dead without a `close` event.
const HIDDEN_RECONNECT_MS: f64 = 30_000.0;
/// With server heartbeats, this many intervals of silence mean a dead socket.
const HEARTBEATS_MISSED: f64 = 2.5;
/// How often the liveness check runs.
const WATCHDOG_EVERY: Duration = Duration::from_secs(5);
/// One POST may take this long (the server answers only once the stream has
/// the record); then it is aborted and retried with the same `client_id`.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// Automatic retries on 429/5xx/network errors before "not sent".
const AUTO_RETRIES: u32 = 3;
/// First automatic retry wait; doubles per retry (jittered).
const SEND_RETRY_BASE_MS: f64 = 500.0;
/// A `Retry-After` longer than this is cut short; the person can retry.
const RETRY_AFTER_MAX_MS: f64 = 30_000.0;
/// Closer than this to the bottom counts as "at the bottom": keep following.
const NEAR_BOTTOM_PX: i32 = 48;

struct Socket {
    ws: WebSocket,
    // Kept alive as long as the socket; dropping them detaches them.
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
    open_timer: Option<TimeoutHandle>,
}

#[derive(Default)]
struct Net {
    chat: Option<Chat>,
    scroller: Option<NodeRef<leptos::html::Main>>,
    socket: Option<Socket>,
    /// Bumped for every new socket; callbacks of older ones do nothing.
    generation: u64,
    /// Failed attempts since the last `ready`.
    attempt: u32,
    reconnect_timer: Option<TimeoutHandle>,
    /// The page is going away (pagehide): do not reconnect.
    leaving: bool,
    /// When the tab was hidden (ms since the epoch).
    hidden_since: Option<f64>,
    /// When the current socket last delivered a frame.
    last_frame_ms: f64,
    /// Interval between the server's heartbeat frames, once two were seen.
    heartbeat_every_ms: Option<f64>,
    last_heartbeat_ms: Option<f64>,
}

thread_local! {
    static NET: RefCell<Net> = RefCell::new(Net::default());
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// Half to all of `ms`, so a restarted server is not hit by every browser
/// in the same instant.
fn jitter(ms: f64) -> f64 {
    ms / 2.0 + js_sys::Math::random() * ms / 2.0
}

fn online() -> bool {
    window().navigator().on_line()
}

/// `body[data-hydrated=true]`: the page is interactive (PROTOCOL.md).
pub fn mark_hydrated() {
    if let Some(body) = document().body() {
        let _ = body.set_attribute("data-hydrated", "true");
    }
}

/// Called once the page is interactive: shows the browser-only facts and
/// opens the socket.
pub fn start(
    chat: Chat,
    scroller: NodeRef<leptos::html::Main>,
    name_input: NodeRef<leptos::html::Input>,
    text_input: NodeRef<leptos::html::Textarea>,
) {
    if let Some(name) = storage().and_then(|s| s.get_item(NAME_KEY).ok().flatten()) {
        chat.name.set(name);
    }
    chat.mounted.set(true);
    NET.with_borrow_mut(|n| {
        n.chat = Some(chat);
        n.scroller = Some(scroller);
    });
    install_page_listeners();
    connect();
    set_interval(watchdog, WATCHDOG_EVERY);

    // After the name (and so the DOM) has settled.
    request_animation_frame(move || {
        scroll_to_bottom(scroller);
        let has_name = !chat.name.get_untracked().trim().is_empty();
        if has_name {
            if let Some(t) = text_input.get_untracked() {
                let _ = t.focus();
            }
        } else if let Some(n) = name_input.get_untracked() {
            let _ = n.focus();
        }
    });
}

fn install_page_listeners() {
    let w = window();
    let on_online = Closure::<dyn FnMut()>::new(reconnect_fresh);
    let on_offline = Closure::<dyn FnMut()>::new(|| {
        let chat = NET.with_borrow(|n| if n.socket.is_none() { n.chat } else { None });
        if let Some(chat) = chat {
            chat.status.set(Status::Offline);
        }
    });
    let on_visibility = Closure::<dyn FnMut()>::new(|| {
        let hidden = document().visibility_state() == web_sys::VisibilityState::Hidden;
        let long_gone = NET.with_borrow_mut(|n| {
            if hidden {
                n.hidden_since = Some(now_ms());
                false
            } else {
                n.hidden_since.take().is_some_and(|t| now_ms() - t >= HIDDEN_RECONNECT_MS)
            }
        });
        if hidden {
            return;
        }
        if long_gone {
            reconnect_fresh();
        } else {
            reconnect_if_waiting();
        }
    });
    let on_pagehide = Closure::<dyn FnMut()>::new(|| {
        let socket = NET.with_borrow_mut(|n| {
            n.leaving = true;
            if let Some(t) = n.reconnect_timer.take() {
                t.clear();
            }
            n.generation += 1;
            n.socket.take()
        });
        if let Some(s) = socket {
            retire(s);
        }
    });
    let on_pageshow = Closure::<dyn FnMut(web_sys::PageTransitionEvent)>::new(|ev: web_sys::PageTransitionEvent| {
        if !ev.persisted() {
            return;
        }
        // Restored from the back/forward cache.
        let chat = NET.with_borrow_mut(|n| {
            n.leaving = false;
            n.chat
        });
        if let Some(chat) = chat {
            chat.status.set(Status::Reconnecting);
        }
        connect();
    });
    let _ = w.add_event_listener_with_callback("online", on_online.as_ref().unchecked_ref());
    let _ = w.add_event_listener_with_callback("offline", on_offline.as_ref().unchecked_ref());
    let _ = document().add_event_listener_with_callback("visibilitychange", on_visibility.as_ref().unchecked_ref());
    let _ = w.add_event_listener_with_callback("pagehide", on_pagehide.as_ref().unchecked_ref());
    let _ = w.add_event_listener_with_callback("pageshow", on_pageshow.as_ref().unchecked_ref());
    // They live as long as the page.
    on_online.forget();
    on_offline.forget();
    on_visibility.forget();
    on_pagehide.forget();
    on_pageshow.forget();
}

// ---- the socket ------------------------------------------------------------

/// Closes a socket we no longer want. Its handlers are detached first: a
/// close event must never reach a callback that has been dropped.
fn retire(s: Socket) {
    if let Some(t) = s.open_timer {
        t.clear();
    }
    s.ws.set_onopen(None);
    s.ws.set_onmessage(None);
    s.ws.set_onclose(None);
    let _ = s.ws.close_with_code(1000);
}

fn socket_url(chat: &Chat) -> String {
    let loc = window().location();
    let scheme = if loc.protocol().ok().as_deref() == Some("https:") { "wss" } else { "ws" };
    let host = loc.host().unwrap_or_default();
    let room = chat.room.get_untracked();
    let mut url = format!("{scheme}://{host}/ws?room={}", encode(&room));
    if let Some(cursor) = chat.cursor() {
        url.push_str("&since=");
        url.push_str(&encode(&cursor));
    }
    url
}

fn encode(s: &str) -> String {
    String::from(js_sys::encode_uri_component(s))
}

fn connect() {
    let (chat, generation) = match NET.with_borrow_mut(|n| {
        if let Some(t) = n.reconnect_timer.take() {
            t.clear();
        }
        if n.leaving || n.socket.is_some() {
            return None;
        }
        n.generation += 1;
        n.chat.map(|c| (c, n.generation))
    }) {
        Some(x) => x,
        None => return,
    };
    let ws = match WebSocket::new(&socket_url(&chat)) {
        Ok(ws) => ws,
        Err(_) => {
            schedule_reconnect();
            return;
        }
    };
    let current = move || NET.with_borrow(|n| n.generation == generation && n.socket.is_some());

    let on_open = Closure::<dyn FnMut(Event)>::new(move |_| {
        NET.with_borrow_mut(|n| {
            if n.generation == generation {
                if let Some(t) = n.socket.as_mut().and_then(|s| s.open_timer.take()) {
                    t.clear();
                }
                n.last_frame_ms = now_ms();
            }
        });
    });
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
        if !current() {
            return;
        }
        if let Some(text) = ev.data().as_string() {
            on_frame(chat, &text);
        }
    });
    let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |_ev: CloseEvent| {
        let was_current = NET.with_borrow_mut(|n| {
            if n.generation != generation {
                return false;
            }
            if let Some(s) = n.socket.take() {
                if let Some(t) = s.open_timer {
                    t.clear();
                }
                // `s` holds this very callback: drop it after it returns.
                leptos::task::spawn_local(async move { drop(s) });
            }
            !n.leaving
        });
        if was_current {
            schedule_reconnect();
        }
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let open_timer = set_timeout_with_handle(
        {
            let ws = ws.clone();
            move || {
                if ws.ready_state() == WebSocket::CONNECTING {
                    let _ = ws.close();
                }
            }
        },
        CONNECT_TIMEOUT,
    )
    .ok();
    NET.with_borrow_mut(|n| {
        n.heartbeat_every_ms = None;
        n.last_heartbeat_ms = None;
        n.socket = Some(Socket { ws, _on_open: on_open, _on_message: on_message, _on_close: on_close, open_timer });
    });
}

fn schedule_reconnect() {
    let (chat, wait) = match NET.with_borrow_mut(|n| {
        if n.leaving {
            return None;
        }
        let ceiling = (RECONNECT_BASE_MS * 2f64.powi(n.attempt as i32)).min(RECONNECT_MAX_MS);
        n.attempt = (n.attempt + 1).min(16);
        if let Some(t) = n.reconnect_timer.take() {
            t.clear();
        }
        n.chat.map(|c| (c, jitter(ceiling)))
    }) {
        Some(x) => x,
        None => return,
    };
    chat.status.set(if online() { Status::Reconnecting } else { Status::Offline });
    let timer = set_timeout_with_handle(connect, Duration::from_millis(wait as u64)).ok();
    NET.with_borrow_mut(|n| n.reconnect_timer = timer);
}

/// Drops the current socket (its close is ignored) and opens a new one at
/// once, resuming after the last cursor.
fn reconnect_fresh() {
    let old = NET.with_borrow_mut(|n| {
        if n.leaving {
            return None;
        }
        n.generation += 1;
        n.attempt = 0;
        n.socket.take()
    });
    if let Some(s) = old {
        retire(s);
    }
    connect();
}

/// A reconnect that is waiting for its timer goes now (e.g. back online).
fn reconnect_if_waiting() {
    let waiting = NET.with_borrow(|n| n.socket.is_none() && n.reconnect_timer.is_some() && !n.leaving);
    if waiting {
        connect();
    }
}

/// The room changed: the server's socket is per room, so open a new one.
pub fn reconnect_now(_chat: Chat) {
    reconnect_fresh();
}

fn watchdog() {
    let dead = NET.with_borrow(|n| match (n.heartbeat_every_ms, &n.socket) {
        (Some(every), Some(s)) if s.ws.ready_state() == WebSocket::OPEN => {
            now_ms() - n.last_frame_ms > every * HEARTBEATS_MISSED
        }
        _ => false,
    });
    if dead {
        leptos::logging::log!("kinesis-chat: no heartbeat from the server; reconnecting");
        reconnect_fresh();
    }
}

fn on_frame(chat: Chat, text: &str) {
    let now = now_ms();
    NET.with_borrow_mut(|n| n.last_frame_ms = now);
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            leptos::logging::warn!("kinesis-chat: ignoring a frame that is not JSON");
            return;
        }
    };
    if value.get("type").and_then(|t| t.as_str()) == Some("heartbeat") {
        NET.with_borrow_mut(|n| {
            if let Some(last) = n.last_heartbeat_ms.replace(now) {
                n.heartbeat_every_ms = Some((now - last).max(1000.0));
            }
        });
        return;
    }
    // A newer server may add frame types; this client ignores them.
    let Ok(frame) = serde_json::from_value::<ServerFrame>(value) else { return };
    let scroller = NET.with_borrow(|n| n.scroller);
    let follow = scroller.is_some_and(at_bottom);
    match chat.on_frame(frame) {
        FrameEffect::Added { mine } => {
            if follow || mine {
                if let Some(s) = scroller {
                    request_animation_frame(move || scroll_to_bottom(s));
                }
            } else {
                chat.unseen_below.set(true);
            }
        }
        FrameEffect::Ready => NET.with_borrow_mut(|n| n.attempt = 0),
        FrameEffect::Nothing => {}
    }
}

// ---- scrolling ---------------------------------------------------------------

fn at_bottom(scroller: NodeRef<leptos::html::Main>) -> bool {
    scroller
        .get_untracked()
        .is_none_or(|el| el.scroll_height() - el.scroll_top() - el.client_height() <= NEAR_BOTTOM_PX)
}

fn scroll_to_bottom(scroller: NodeRef<leptos::html::Main>) {
    if let Some(el) = scroller.get_untracked() {
        el.set_scroll_top(el.scroll_height());
    }
}

pub fn on_scroll(chat: Chat, scroller: NodeRef<leptos::html::Main>) {
    if chat.unseen_below.get_untracked() && at_bottom(scroller) {
        chat.unseen_below.set(false);
    }
}

pub fn jump_to_newest(chat: Chat, scroller: NodeRef<leptos::html::Main>, text: NodeRef<leptos::html::Textarea>) {
    scroll_to_bottom(scroller);
    chat.unseen_below.set(false);
    if let Some(t) = text.get_untracked() {
        let _ = t.focus();
    }
}

// ---- the composer --------------------------------------------------------------

fn storage() -> Option<web_sys::Storage> {
    // None in private modes that refuse storage.
    window().local_storage().ok().flatten()
}

pub fn save_name(chat: Chat) {
    if let Ok(name) = validate_author(&chat.name.get_untracked()) {
        if let Some(s) = storage() {
            let _ = s.set_item(NAME_KEY, &name);
        }
    }
}

/// Grows the message field with its text (up to the CSS max-height).
pub fn autosize(text: NodeRef<leptos::html::Textarea>) {
    if let Some(ta) = text.get_untracked() {
        let style = web_sys::HtmlElement::style(&ta);
        let _ = style.set_property("height", "auto");
        let h = ta.scroll_height() + (ta.offset_height() - ta.client_height());
        let _ = style.set_property("height", &format!("{h}px"));
    }
}

/// A random (v4) UUID from the browser's CSPRNG.
fn new_client_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(crypto) = window().crypto() {
        let _ = crypto.get_random_values_with_u8_array(&mut bytes);
    } else {
        for b in &mut bytes {
            *b = (js_sys::Math::random() * 256.0) as u8;
        }
    }
    uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().to_string()
}

pub fn submit(chat: Chat, name_input: NodeRef<leptos::html::Input>, text_input: NodeRef<leptos::html::Textarea>) {
    match chat.submit(new_client_id()) {
        Ok(id) => {
            save_name(chat);
            if let Some(t) = text_input.get_untracked() {
                let _ = t.focus();
            }
            let scroller = NET.with_borrow(|n| n.scroller);
            request_animation_frame(move || {
                autosize(text_input);
                if let Some(s) = scroller {
                    scroll_to_bottom(s);
                }
            });
            leptos::task::spawn_local(deliver(chat, id));
        }
        Err(SubmitError::Name) => {
            if let Some(n) = name_input.get_untracked() {
                let _ = n.focus();
            }
        }
        Err(SubmitError::Empty | SubmitError::Text) => {
            if let Some(t) = text_input.get_untracked() {
                let _ = t.focus();
            }
        }
    }
}

pub fn retry(chat: Chat, id: String) {
    chat.form_error.set(None);
    leptos::task::spawn_local(deliver(chat, id));
}

// ---- sending ---------------------------------------------------------------------

/// Why one POST did not land.
struct Failure {
    /// 429, 5xx, timeout or network: worth trying again with the same id.
    retryable: bool,
    /// A sentence for the person (the server's, when it sent one).
    problem: String,
    /// The server's `Retry-After`, in ms.
    wait_ms: Option<f64>,
}

/// Sends an outbox entry until it lands or the retries are spent; always
/// with the same `client_id`, so the server keeps it once.
async fn deliver(chat: Chat, id: String) {
    let Some(body) = chat.start_delivery(&id) else { return };
    let mut tries = 0u32;
    loop {
        let outcome = post_once(&body).await;
        if !chat.is_outgoing(&id) {
            return; // its echo arrived first, or it was discarded
        }
        match outcome {
            Ok(message) => {
                chat.settle(&id, Ok(message));
                return;
            }
            Err(f) if f.retryable && tries < AUTO_RETRIES => {
                let wait = f.wait_ms.unwrap_or_else(|| jitter(SEND_RETRY_BASE_MS * 2f64.powi(tries as i32)));
                tries += 1;
                chat.mark(&id, Delivery::Sending { retrying: true });
                sleep(wait).await;
                if !chat.is_outgoing(&id) {
                    return;
                }
            }
            Err(f) => {
                // The failure grows the row (sentence, buttons): keep it in view.
                let scroller = NET.with_borrow(|n| n.scroller);
                let follow = scroller.is_some_and(at_bottom);
                chat.settle(&id, Err((f.problem, !f.retryable)));
                if let (true, Some(s)) = (follow, scroller) {
                    request_animation_frame(move || scroll_to_bottom(s));
                }
                return;
            }
        }
    }
}

async fn post_once(body: &PostMessage) -> Result<Option<ChatMessage>, Failure> {
    let controller = web_sys::AbortController::new().ok();
    let signal = controller.as_ref().map(|c| c.signal());
    let timer = controller.and_then(|c| set_timeout_with_handle(move || c.abort(), SEND_TIMEOUT).ok());
    let sent = gloo_net::http::Request::post("/api/messages")
        .header("Accept", "application/json")
        .abort_signal(signal.as_ref())
        .json(body);
    let response = match sent {
        Ok(request) => request.send().await,
        Err(e) => Err(e),
    };
    if let Some(t) = timer {
        t.clear();
    }
    let response = match response {
        Ok(r) => r,
        Err(_) => {
            return Err(Failure {
                retryable: true,
                problem: if online() { "Could not reach the server." } else { "You are offline." }.to_owned(),
                wait_ms: None,
            })
        }
    };
    let status = response.status();
    if status == 200 || status == 201 {
        return Ok(response.json::<PostResponse>().await.ok().map(|r| r.message));
    }
    let retry_after = response.headers().get("Retry-After");
    let said = response
        .json::<ErrorBody>()
        .await
        .ok()
        .map(|e| e.error.trim().to_owned())
        .filter(|e| !e.is_empty());
    if status == 429 || status >= 500 {
        Err(Failure {
            retryable: true,
            problem: said.unwrap_or_else(|| format!("The server could not take the message just now ({status}).")),
            wait_ms: retry_after.as_deref().and_then(retry_after_ms),
        })
    } else {
        Err(Failure {
            retryable: false,
            problem: said.unwrap_or_else(|| format!("The server refused the message ({status}).")),
            wait_ms: None,
        })
    }
}

/// `Retry-After` in seconds (the form this server sends), as capped ms.
fn retry_after_ms(header: &str) -> Option<f64> {
    let secs: f64 = header.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).min(RETRY_AFTER_MAX_MS))
}

async fn sleep(ms: f64) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let _ = window().set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms.max(0.0) as i32);
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

// ---- the clock -------------------------------------------------------------------

fn call_locale(date: &js_sys::Date, method: &str, options: &[(&str, &str)]) -> Option<String> {
    let opts = js_sys::Object::new();
    for (k, v) in options {
        js_sys::Reflect::set(&opts, &JsValue::from_str(k), &JsValue::from_str(v)).ok()?;
    }
    let f: js_sys::Function = js_sys::Reflect::get(date, &JsValue::from_str(method)).ok()?.dyn_into().ok()?;
    f.call2(date, &JsValue::UNDEFINED, &opts).ok()?.as_string()
}

fn parse_date(iso: &str) -> Option<js_sys::Date> {
    let d = js_sys::Date::new(&JsValue::from_str(iso));
    (!d.get_time().is_nan()).then_some(d)
}

/// "16:04" today, "3 Dec, 16:04" otherwise, in the reader's zone and locale.
pub fn local_time(iso: &str) -> Option<String> {
    let d = parse_date(iso)?;
    let today = js_sys::Date::new_0();
    if d.to_date_string() == today.to_date_string() {
        call_locale(&d, "toLocaleTimeString", &[("hour", "2-digit"), ("minute", "2-digit")])
    } else {
        call_locale(
            &d,
            "toLocaleString",
            &[("month", "short"), ("day", "numeric"), ("hour", "2-digit"), ("minute", "2-digit")],
        )
    }
}

/// The full date and time, for the tooltip.
pub fn local_full_time(iso: &str) -> Option<String> {
    let d = parse_date(iso)?;
    call_locale(&d, "toLocaleString", &[("dateStyle", "full"), ("timeStyle", "medium")])
}
