//! The chat page's components. The `data-testid` hooks are PROTOCOL.md's
//! ("UI test hooks"), the same as the plain client's, and so are the words
//! the browser tests look for ("sending…", "not sent", "Retry").

use super::chat::{room_from_query, Chat, Delivery, Item, COUNTER_FROM};
#[cfg(feature = "browser")]
use super::net;
use crate::protocol::HistoryEntry;
use crate::validate::{text_chars_left, validate_room};
use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::{use_navigate, use_query_map};

/// The room's history as the server rendered it; the browser reads the
/// same value back during hydration (and gets an empty one when it renders
/// on its own: the socket then brings the history).
fn initial_history(room: &str) -> Vec<HistoryEntry> {
    #[cfg(feature = "ssr")]
    if let Some(source) = use_context::<super::HistorySource>() {
        return (source.0)(room);
    }
    let _ = room;
    Vec::new()
}

/// `/` and `/?room=name`.
#[component]
pub fn ChatPage() -> impl IntoView {
    let query = use_query_map();
    let asked = Memo::new(move |_| query.with(|q| q.get("room")));
    let (room, notice) = room_from_query(asked.get_untracked().as_deref());
    let history = SharedValue::new({
        let room = room.clone();
        move || initial_history(&room)
    })
    .into_inner();
    let chat = Chat::new(room, notice, history);
    provide_context(chat);

    let scroller = NodeRef::<leptos::html::Main>::new();
    let name_input = NodeRef::<leptos::html::Input>::new();
    let text_input = NodeRef::<leptos::html::Textarea>::new();

    // The URL's room changes without a reload (the room form, back/forward).
    Effect::new(move |previous: Option<()>| {
        let (room, notice) = room_from_query(asked.get().as_deref());
        if previous.is_some() && room != chat.room.get_untracked() {
            chat.notice.set(notice);
            chat.enter_room(room);
            #[cfg(feature = "browser")]
            net::reconnect_now(chat);
        }
    });

    // Browser only, once: the stored name, local times, the socket.
    Effect::new(move |_| {
        #[cfg(feature = "browser")]
        net::start(chat, scroller, name_input, text_input);
    });

    let title = move || format!("#{} · kinesis-chat", chat.room.get());

    view! {
        <Title text=title/>
        <header class="bar">
            <h1 class="title">
                <span class="brand">"kinesis-chat"</span>
                <span class="room" aria-label="Room">
                    <span aria-hidden="true">"#"</span>
                    <span data-testid="room">{move || chat.room.get()}</span>
                </span>
            </h1>
            <RoomSwitcher/>
            <p class="status" data-testid="status" data-state=move || chat.status.get().as_str() role="status">
                {move || chat.status.get().label()}
            </p>
        </header>
        <Show when=move || chat.notice.with(Option::is_some)>
            <p class="notice" role="alert">{move || chat.notice.get().unwrap_or_default()}</p>
        </Show>
        <main class="scroller" node_ref=scroller on:scroll=move |_| {
            #[cfg(feature = "browser")]
            net::on_scroll(chat, scroller);
        }>
            <Show when=move || chat.items.with(Vec::is_empty)>
                <p class="empty">"No messages yet. Say hello!"</p>
            </Show>
            <ol class="messages" data-testid="message-list" aria-live="polite" aria-relevant="additions" aria-label="Messages">
                <For each=move || chat.items.get() key=|item| item.id.clone() let:item>
                    <Message item/>
                </For>
            </ol>
        </main>
        <Show when=move || chat.unseen_below.get()>
            <button type="button" class="jump" on:click=move |_| {
                #[cfg(feature = "browser")]
                net::jump_to_newest(chat, scroller, text_input);
            }>"New messages ↓"</button>
        </Show>
        <Composer name_input text_input/>
    }
}

/// A small form that moves to another room without reloading the page.
#[component]
fn RoomSwitcher() -> impl IntoView {
    let chat = expect_context::<Chat>();
    let navigate = use_navigate();
    let wanted = RwSignal::new(String::new());
    let problem = RwSignal::new(None::<String>);
    let go = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let room = wanted.get_untracked().trim().to_lowercase();
        if room.is_empty() {
            return;
        }
        match validate_room(&room) {
            Ok(()) => {
                problem.set(None);
                wanted.set(String::new());
                if room != chat.room.get_untracked() {
                    navigate(&format!("/?room={room}"), Default::default());
                }
            }
            Err(e) => problem.set(Some(e.message)),
        }
    };
    view! {
        <form class="switch" on:submit=go role="search" aria-label="Switch room">
            <label for="room-input" class="visually-hidden">"Go to room"</label>
            <input id="room-input" type="text" placeholder="room" autocomplete="off" spellcheck="false"
                autocapitalize="none" enterkeyhint="go" aria-describedby="room-problem"
                prop:value=move || wanted.get() on:input=move |ev| wanted.set(event_target_value(&ev))/>
            <button type="submit" class="secondary">"Go"</button>
            {move || problem.get().map(|p| view! { <span id="room-problem" class="room-problem" role="alert">{p}</span> })}
        </form>
    }
}

/// One message: author, local time, text; our own ones show their delivery.
#[component]
fn Message(item: Item) -> impl IntoView {
    let chat = expect_context::<Chat>();
    let delivery = item.delivery.clone();
    let sent_at = item.sent_at.clone();
    let author = item.author.clone();
    let id = item.id.clone();
    let sent_here = item.sent_here;

    let mine = {
        let author = author.clone();
        move || sent_here || (chat.mounted.get() && chat.name.with(|n| !n.trim().is_empty() && n.trim() == &*author))
    };
    let state = {
        let d = delivery.clone();
        move || match d.get() {
            Delivery::Shown => "shown",
            Delivery::Sending { .. } => "sending",
            Delivery::Accepted => "sent",
            Delivery::Failed { .. } => "failed",
        }
    };
    let note = {
        let d = delivery.clone();
        move || match d.get() {
            Delivery::Sending { retrying: false } => "sending…",
            Delivery::Sending { retrying: true } => "sending… (trying again)",
            Delivery::Failed { .. } => "not sent — retry",
            Delivery::Shown | Delivery::Accepted => "",
        }
    };
    let problem = {
        let d = delivery.clone();
        move || match d.get() {
            Delivery::Failed { problem } => Some(problem),
            _ => None,
        }
    };
    let time = {
        let sent_at = sent_at.clone();
        move || clock(&sent_at.get(), chat.mounted.get())
    };
    let full_time = move || {
        if chat.mounted.get() {
            full_clock(&sent_at.get())
        } else {
            String::new()
        }
    };
    let failed = {
        let d = delivery.clone();
        move || matches!(d.get(), Delivery::Failed { .. })
    };
    let sending = {
        let d = delivery.clone();
        move || matches!(d.get(), Delivery::Sending { .. })
    };
    let retry_id = id.clone();
    let discard_id = id.clone();

    view! {
        <li class="msg" class:mine=mine class:failed=failed.clone() class:sending=sending data-testid="message"
            data-id=id.to_string() data-state=state>
            <div class="meta">
                <span class="author" data-testid="author" dir="auto">{author.to_string()}</span>
                " "
                <time class="time" datetime=move || item.sent_at.get() title=full_time>{time}</time>
                " "
                <span class="note">{note}</span>
            </div>
            <p class="text" data-testid="text" dir="auto">{item.text.to_string()}</p>
            {move || problem().map(|p| view! { <p class="problem">{p}</p> })}
            <Show when=failed.clone()>
                <div class="actions">
                    <button type="button" class="retry" on:click={
                        let id = retry_id.clone();
                        move |_| {
                            #[cfg(feature = "browser")]
                            net::retry(chat, id.to_string());
                            let _ = &id;
                        }
                    }>"Retry"</button>
                    <button type="button" class="discard" on:click={
                        let id = discard_id.clone();
                        move |_| chat.discard(&id)
                    }>"Discard"</button>
                </div>
            </Show>
        </li>
    }
}

/// The name, the message, the send button.
#[component]
fn Composer(name_input: NodeRef<leptos::html::Input>, text_input: NodeRef<leptos::html::Textarea>) -> impl IntoView {
    let chat = expect_context::<Chat>();
    let left = move || chat.draft.with(|d| text_chars_left(d));
    let counter = move || {
        let n = left();
        if n > COUNTER_FROM {
            String::new()
        } else if n >= 0 {
            format!("{n} {} left", if n == 1 { "character" } else { "characters" })
        } else {
            format!("{} {} too many", -n, if n == -1 { "character" } else { "characters" })
        }
    };
    let send = move || {
        #[cfg(feature = "browser")]
        net::submit(chat, name_input, text_input);
    };
    view! {
        <form class="composer" novalidate on:submit=move |ev| {
            ev.prevent_default();
            send();
        }>
            <div class="name-row">
                <label for="name">"Your name"</label>
                <input id="name" name="author" data-testid="name-input" type="text" autocomplete="nickname"
                    spellcheck="false" enterkeyhint="next" required node_ref=name_input
                    prop:value=move || chat.name.get()
                    on:input=move |ev| chat.name.set(event_target_value(&ev))
                    on:change=move |_| {
                        #[cfg(feature = "browser")]
                        net::save_name(chat);
                    }
                    on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                        if ev.key() == "Enter" && !ev.is_composing() {
                            ev.prevent_default();
                            if let Some(t) = text_input.get_untracked() {
                                let _ = t.focus();
                            }
                        }
                    }/>
            </div>
            <div class="text-row">
                <label for="text" class="visually-hidden">"Message"</label>
                <textarea id="text" name="text" data-testid="message-input" rows="1" enterkeyhint="send"
                    aria-describedby="hint counter" placeholder="Write a message…" required node_ref=text_input
                    prop:value=move || chat.draft.get()
                    on:input=move |ev| {
                        chat.draft.set(event_target_value(&ev));
                        #[cfg(feature = "browser")]
                        net::autosize(text_input);
                    }
                    on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                        // Enter sends; Shift+Enter is a new line; never while an IME composes.
                        if ev.key() != "Enter" || ev.shift_key() || ev.alt_key() || ev.is_composing() || ev.key_code() == 229 {
                            return;
                        }
                        ev.prevent_default();
                        send();
                    }></textarea>
                <button type="submit" data-testid="send-button">"Send"</button>
            </div>
            <p class="hint" class:has-counter=move || left() <= COUNTER_FROM>
                <span id="hint">"Enter sends · Shift+Enter adds a new line"</span>
                <span id="counter" class="counter" class:over=move || left() < 0 aria-live="polite">{counter}</span>
            </p>
            <p class="form-error" role="alert" hidden=move || chat.form_error.with(Option::is_none)>
                {move || chat.form_error.get().unwrap_or_default()}
            </p>
        </form>
    }
}

/// "16:04" for today, "3 Dec, 16:04" otherwise, in the reader's time zone
/// once the browser runs; until then (server render, hydration) the UTC
/// time, so the server's HTML and the first browser render agree.
fn clock(iso: &str, local: bool) -> String {
    if iso.is_empty() {
        return String::new();
    }
    #[cfg(feature = "browser")]
    if local {
        if let Some(s) = net::local_time(iso) {
            return s;
        }
    }
    let _ = local;
    // RFC 3339 from our server: "2026-12-03T16:00:00.123Z" (ASCII).
    match iso.get(11..16) {
        Some(hm) => format!("{hm} UTC"),
        None => String::new(),
    }
}

fn full_clock(iso: &str) -> String {
    #[cfg(feature = "browser")]
    if let Some(s) = net::local_full_time(iso) {
        return s;
    }
    iso.to_owned()
}
