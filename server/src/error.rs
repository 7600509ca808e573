//! Every error a client can see, and how it is answered.
//!
//! Each variant knows its status; the body is always the protocol's JSON
//! `{"error": "...", "field"?: "..."}`. A client error is never a 500, and
//! an internal error shows only a plain sentence (the detail goes to logs).

use app::ErrorBody;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input; `field` names the culprit when known.
    #[error("{message}")]
    BadRequest { message: String, field: Option<&'static str> },
    #[error("The request body is larger than {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("Send the message as JSON with Content-Type: application/json.")]
    UnsupportedMediaType,
    #[error("Too many messages; wait {retry_after_secs} s and try again.")]
    TooManyRequests { retry_after_secs: u64 },
    /// The stream did not accept the message; the client should keep it and retry.
    #[error("{message}")]
    Unavailable { message: String, retry_after_secs: u64 },
    #[error("Nothing here: {path}")]
    NotFound { path: String },
    #[error("This method is not allowed here.")]
    MethodNotAllowed,
    #[error("Internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, field: Option<&'static str>) -> Self {
        ApiError::BadRequest { message: message.into(), field }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The metric label for a refused POST.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "invalid",
            ApiError::PayloadTooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType => "unsupported_type",
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after_secs } | ApiError::Unavailable { retry_after_secs, .. } => {
                Some(*retry_after_secs)
            }
            _ => None,
        };
        let (error, field) = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                ("Something went wrong on our side; please try again.".to_owned(), None)
            }
            ApiError::BadRequest { field, .. } => (self.to_string(), field.map(str::to_owned)),
            _ => (self.to_string(), None),
        };
        let mut resp = (status, Json(ErrorBody { error, field })).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
