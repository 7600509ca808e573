//! The HTTP routes of docs/PROTOCOL.md: post and page messages, the
//! WebSocket upgrade, health, readiness and metrics.
//!
//! Request bodies are read and checked by hand rather than with axum's
//! `Json` extractor, so every refusal is the protocol's JSON error with the
//! right status (400, 413, 415) and names the offending field.

use crate::backend::Appended;
use crate::cursor::Position;
use crate::error::ApiError;
use crate::rooms::Entry;
use crate::serve::Handshake;
use crate::{ws, AppState};
use app::{
    validate, ChatMessage, HistoryEntry, HistoryResponse, PostMessage, PostResponse, DEFAULT_HISTORY, DEFAULT_ROOM,
    MAX_BODY_BYTES, MAX_HISTORY_LIMIT,
};
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The client's address, for rate limiting. Requests that arrive without
/// connection info (router tests) share one unspecified address.
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ci| ci.0.ip());
        Ok(ClientIp(ip))
    }
}

/// `POST /api/messages`
pub async fn post_message(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request: Request,
) -> Result<Response, ApiError> {
    let result = accept_post(&state, ip, request).await;
    if let Err(e) = &result {
        state.metrics.reject(e.reason());
    }
    result
}

async fn accept_post(state: &AppState, ip: IpAddr, request: Request) -> Result<Response, ApiError> {
    if let Err(retry_after_secs) = state.limiter.check(ip) {
        return Err(ApiError::TooManyRequests { retry_after_secs });
    }
    if !is_json(request.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        // Refused before a byte of it is read.
        return Err(ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES });
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, read_body(request.into_body())).await {
        Ok(body) => body?,
        Err(_) => {
            return Err(ApiError::bad_request(
                format!("The request body did not arrive within {} s.", BODY_TIMEOUT.as_secs()),
                None,
            ))
        }
    };
    let post = parse_post(&body)?;
    let valid = validate::validate_post(&post).map_err(|e| ApiError::bad_request(e.message, Some(e.field)))?;

    if let Some(id) = &valid.client_id {
        if let Some(existing) = state.rooms.lookup_id(id) {
            return Ok(repeat_answer(&existing));
        }
    }
    let message = ChatMessage {
        id: valid.client_id.unwrap_or_else(|| uuid::Uuid::now_v7().hyphenated().to_string()),
        room: valid.room,
        author: valid.author,
        text: valid.text,
        sent_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    match state.backend.append(message.clone()).await {
        Ok(Appended::New(pos)) => {
            state.metrics.messages_accepted.inc();
            let body = PostResponse { message, cursor: pos.encode() };
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        Ok(Appended::Existing(existing)) => Ok(repeat_answer(&existing)),
        Err(e) => {
            tracing::warn!(error = %e, "append refused");
            let crate::backend::AppendError::Unavailable { reason, retry_after_secs } = e;
            Err(ApiError::Unavailable { message: reason, retry_after_secs })
        }
    }
}

fn repeat_answer(existing: &Entry) -> Response {
    let body = PostResponse { message: existing.message.clone(), cursor: existing.cursor.clone() };
    (StatusCode::OK, Json(body)).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// How long a client may take to send a POST body (at most 16 KiB): a
/// body that never ends must not hold a connection forever.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn read_body(body: Body) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES })
        }
        Err(e) => Err(ApiError::bad_request(format!("Could not read the request body: {e}"), None)),
    }
}

/// Parses the body field by field, so a 400 names the field at fault.
fn parse_post(body: &[u8]) -> Result<PostMessage, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The body is not valid JSON ({e})."), None))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_request("The body must be a JSON object.", None));
    };
    Ok(PostMessage {
        room: optional_string(&obj, "room")?,
        author: required_string(&obj, "author")?,
        text: required_string(&obj, "text")?,
        client_id: optional_string(&obj, "client_id")?,
    })
}

fn optional_string(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!("`{field}` must be a string."), Some(field))),
    }
}

fn required_string(obj: &Map<String, Value>, field: &'static str) -> Result<String, ApiError> {
    optional_string(obj, field)?
        .ok_or_else(|| ApiError::bad_request(format!("`{field}` is required."), Some(field)))
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    room: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /api/messages`
pub async fn get_messages(
    State(state): State<AppState>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("Bad query string ({e})."), None))?;
    let room = room_param(q.room)?;
    let limit = match q.limit.as_deref() {
        None => DEFAULT_HISTORY,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_HISTORY_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    format!("`limit` must be a whole number from 1 to {MAX_HISTORY_LIMIT}."),
                    Some("limit"),
                ))
            }
        },
    };
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(c) => Some(Position::decode(c).ok_or_else(|| {
            ApiError::bad_request("`before` is not a cursor this service issued.", Some("before"))
        })?),
    };
    let messages = state
        .rooms
        .history(&room, before.as_ref(), limit)
        .iter()
        .map(|e| HistoryEntry { cursor: e.cursor.clone(), message: e.message.clone() })
        .collect();
    Ok(Json(HistoryResponse { messages }))
}

fn room_param(room: Option<String>) -> Result<String, ApiError> {
    match room {
        None => Ok(DEFAULT_ROOM.to_owned()),
        Some(r) => {
            validate::validate_room(&r).map_err(|e| ApiError::bad_request(e.message, Some(e.field)))?;
            Ok(r)
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    room: Option<String>,
    since: Option<String>,
}

/// `GET /ws`
pub async fn websocket(
    State(state): State<AppState>,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("Bad query string ({e})."), None))?;
    let room = room_param(q.room)?;
    let handshake = Handshake::from_request(&mut request)?;
    let since = q.since.filter(|s| !s.is_empty());
    let sessions = state.sessions.clone();
    Ok(handshake.respond(&sessions, move |stream, early| ws::run_session(stream, early, state, room, since)))
}

/// `GET /healthz`: the process serves.
pub async fn healthz() -> Json<Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: the backend is reachable and its reader runs.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.backend.readiness() {
        Ok(()) => Json(serde_json::json!({"status": "ready", "backend": state.backend.name()})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": reason, "backend": state.backend.name()})),
        )
            .into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

/// Unknown paths: a JSON 404.
pub async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound { path: request.uri().path().to_owned() }
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
