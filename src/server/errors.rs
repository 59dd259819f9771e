//! Every refusal the server gives, as JSON in the convention of the route that was called:
//! text-embeddings-inference's `{"error", "error_type"}` on `/embed` and the other routes,
//! OpenAI's `{"error": {"message", "type", "param", "code"}}` under `/v1/`.
//!
//! The status codes (README, "Errors"): 400 for a body that is not JSON or has no text to
//! embed; 422 for JSON whose values cannot be used (a wrong type, an unknown option, token-id
//! inputs, `dimensions` out of range, a text over the limit with truncation off); 413 for too
//! much at once (body bytes, declared or sent, or texts per request); 415 for a body that is
//! not declared as JSON; 401 without the API key; 408 for a body not in within the body
//! timeout; 429 over the concurrency limit or the budget of body bytes in flight; 500 for a
//! batch the engine failed on; 503 while loading, once the engine is broken, or for a batch
//! the device had no memory for.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which JSON shape an error takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// text-embeddings-inference: `{"error": "...", "error_type": "Validation"}`.
    Tei,
    /// OpenAI: `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
}

impl Style {
    /// OpenAI's shape for everything under `/v1/`, TEI's elsewhere.
    pub fn for_path(path: &str) -> Style {
        if path.starts_with("/v1/") {
            Style::OpenAi
        } else {
            Style::Tei
        }
    }
}

/// What went wrong; fixes the status and both conventions' type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON.
    InvalidJson,
    /// No texts, or an empty (whitespace-only) text.
    Empty,
    /// Well-formed JSON with a value the server cannot use.
    InvalidValue,
    /// A text over the model's limit while truncation is off.
    TooLong,
    /// More texts in one request than `--max-client-batch-size`.
    TooManyInputs,
    /// A body over `--payload-limit` bytes.
    PayloadTooLarge,
    /// A body not declared as `application/json`.
    UnsupportedMediaType,
    /// A body not complete within `--body-timeout-secs`.
    BodyTimeout,
    /// The client closed the connection mid-body (nobody reads the answer; counted apart).
    Aborted,
    /// `--api-key` is set and the request does not carry it.
    Unauthorized,
    /// `--max-concurrent-requests` are already being served (or the queue is full).
    Overloaded,
    /// The model is still loading, or the engine stopped.
    Unhealthy,
    /// The engine failed on a batch.
    Backend,
    /// The device had no memory for a batch; the server goes on.
    OutOfMemory,
    NotFound,
    MethodNotAllowed,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            InvalidJson | Empty => StatusCode::BAD_REQUEST,
            InvalidValue | TooLong => StatusCode::UNPROCESSABLE_ENTITY,
            TooManyInputs | PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Overloaded => StatusCode::TOO_MANY_REQUESTS,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Aborted => StatusCode::BAD_REQUEST,
            Unhealthy | OutOfMemory => StatusCode::SERVICE_UNAVAILABLE,
            Backend => StatusCode::INTERNAL_SERVER_ERROR,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// TEI's `error_type` (its names where TEI has the case).
    pub fn tei_type(self) -> &'static str {
        use ErrorKind::*;
        match self {
            Empty => "Empty",
            InvalidJson | InvalidValue | TooLong | TooManyInputs | PayloadTooLarge
            | UnsupportedMediaType | Aborted => "Validation",
            BodyTimeout => "Timeout",
            Unauthorized => "Unauthorized",
            Overloaded => "Overloaded",
            Unhealthy => "Unhealthy",
            Backend | OutOfMemory => "Backend",
            NotFound => "NotFound",
            MethodNotAllowed => "MethodNotAllowed",
        }
    }

    /// OpenAI's `type` and `code`.
    pub fn openai_type_code(self) -> (&'static str, &'static str) {
        use ErrorKind::*;
        match self {
            InvalidJson => ("invalid_request_error", "invalid_json"),
            Empty => ("invalid_request_error", "empty_input"),
            InvalidValue => ("invalid_request_error", "invalid_value"),
            TooLong => ("invalid_request_error", "context_length_exceeded"),
            TooManyInputs => ("invalid_request_error", "too_many_inputs"),
            PayloadTooLarge => ("invalid_request_error", "payload_too_large"),
            UnsupportedMediaType => ("invalid_request_error", "unsupported_media_type"),
            BodyTimeout => ("invalid_request_error", "request_timeout"),
            Aborted => ("invalid_request_error", "aborted"),
            Unauthorized => ("invalid_request_error", "invalid_api_key"),
            Overloaded => ("rate_limit_error", "rate_limit_exceeded"),
            Unhealthy => ("server_error", "model_not_ready"),
            Backend => ("server_error", "engine_error"),
            OutOfMemory => ("server_error", "out_of_memory"),
            NotFound => ("invalid_request_error", "not_found"),
            MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
        }
    }
}

/// A refusal: its kind, a message for the caller, and (OpenAI's `param`) the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The JSON response in `style`.
    pub fn into_response(self, style: Style) -> Response {
        let body = match style {
            Style::Tei => json!({"error": self.message, "error_type": self.kind.tei_type()}),
            Style::OpenAi => {
                let (ty, code) = self.kind.openai_type_code();
                json!({"error": {"message": self.message, "type": ty, "param": self.param, "code": code}})
            }
        };
        let mut r = (self.kind.status(), axum::Json(body)).into_response();
        match self.kind {
            ErrorKind::Unauthorized => {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // For the metrics middleware: not an answered request.
            ErrorKind::Aborted => {
                r.extensions_mut().insert(Aborted);
            }
            _ => {}
        }
        r
    }

    /// serde's verdict on a body: not JSON at all (400) or JSON of the wrong shape (422).
    pub fn from_json_error(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let at = if path == "." {
                    String::new()
                } else {
                    format!("`{path}`: ")
                };
                let err = ApiError::new(
                    ErrorKind::InvalidValue,
                    format!("invalid request: {at}{inner}"),
                );
                if path == "." {
                    err
                } else {
                    err.with_param(path)
                }
            }
            _ => ApiError::new(
                ErrorKind::InvalidJson,
                format!("the request body is not valid JSON: {inner}"),
            ),
        }
    }
}

/// Marks the response to a request whose client went away mid-body.
#[derive(Debug, Clone, Copy)]
pub struct Aborted;

/// `Content-Type` must name JSON (`application/json`, or any `+json` type).
pub fn check_json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        let got = if ct.is_empty() {
            "none".to_string()
        } else {
            format!("{ct:?}")
        };
        Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            format!("expected `Content-Type: application/json`, got {got}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ApiError {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct R {
            input: String,
            dimensions: Option<u32>,
        }
        let mut de = serde_json::Deserializer::from_str(s);
        let e = serde_path_to_error::deserialize::<_, R>(&mut de).unwrap_err();
        ApiError::from_json_error(e)
    }

    #[test]
    fn json_errors_are_classified() {
        let syntax = parse("{\"input\": ");
        assert_eq!(syntax.kind, ErrorKind::InvalidJson);
        assert_eq!(syntax.kind.status(), StatusCode::BAD_REQUEST);
        let wrong = parse("{\"input\": \"a\", \"dimensions\": \"x\"}");
        assert_eq!(wrong.kind, ErrorKind::InvalidValue);
        assert_eq!(wrong.param.as_deref(), Some("dimensions"));
        let missing = parse("{}");
        assert_eq!(missing.kind, ErrorKind::InvalidValue);
        assert!(missing.message.contains("missing field `input`"));
    }

    #[test]
    fn content_types() {
        let mut h = axum::http::HeaderMap::new();
        assert!(check_json_content_type(&h).is_err());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(check_json_content_type(&h).is_ok());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let e = check_json_content_type(&h).unwrap_err();
        assert_eq!(e.kind.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
