//! Errors of the router, and the one table that maps them to HTTP status + JSON.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// A request that does not pass validation.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ValidationError {
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`max_new_tokens` must be strictly positive, got {0}")]
    MaxNewTokens(i64),
    #[error("`temperature` must be strictly positive, got {0}")]
    Temperature(f32),
    #[error("`top_p` must be > 0.0 and <= 1.0, got {0}")]
    TopP(f32),
    #[error("`top_k` must be >= 0, got {0}")]
    TopK(i64),
    #[error("`repetition_penalty` must be strictly positive, got {0}")]
    RepetitionPenalty(f32),
    #[error("`truncate` must be strictly positive and at most {1}, got {0}")]
    Truncate(i64, u32),
    #[error("`inputs` must have at most {0} tokens, got {1}")]
    InputLength(u32, u32),
    #[error("`inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    TotalTokens(u32, u32, u32),
    #[error("`stop` supports at most {0} stop sequences, got {1}")]
    StopSequences(usize, usize),
    #[error("`stop` sequences cannot be empty")]
    EmptyStop,
    #[error("`{0}` is not supported by this server yet")]
    Unsupported(&'static str),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// Why an inference request failed.
#[derive(Debug, thiserror::Error, Clone)]
pub enum InferError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("Model is overloaded")]
    Overloaded,
    #[error("request failed during generation: {0}")]
    Generation(String),
    #[error("request dropped by the scheduler without an answer")]
    Dropped,
    #[error("the server is not ready: {0}")]
    NotReady(String),
}

/// A client-side problem with the HTTP body itself.
#[derive(Debug, thiserror::Error, Clone)]
pub enum RequestError {
    #[error("malformed request body: {0}")]
    Malformed(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("expected `Content-Type: application/json`")]
    ContentType,
    #[error("not found: {0}")]
    NotFound(String),
}

/// The JSON body of every error response and SSE error event.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub error_type: String,
}

/// Status and error type for every error: the single mapping table.
pub trait ErrorKind {
    fn status(&self) -> StatusCode;
    fn error_type(&self) -> &'static str;
    fn body(&self) -> ErrorBody
    where
        Self: std::fmt::Display,
    {
        ErrorBody { error: self.to_string(), error_type: self.error_type().to_string() }
    }
}

impl ErrorKind for InferError {
    fn status(&self) -> StatusCode {
        match self {
            InferError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InferError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            InferError::Generation(_) | InferError::Dropped => StatusCode::FAILED_DEPENDENCY,
            InferError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    fn error_type(&self) -> &'static str {
        match self {
            InferError::Validation(_) => "validation",
            InferError::Overloaded => "overloaded",
            InferError::Generation(_) => "generation",
            InferError::Dropped => "dropped",
            InferError::NotReady(_) => "unavailable",
        }
    }
}

impl ErrorKind for RequestError {
    fn status(&self) -> StatusCode {
        match self {
            RequestError::Malformed(_) => StatusCode::BAD_REQUEST,
            RequestError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RequestError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestError::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }
    fn error_type(&self) -> &'static str {
        match self {
            RequestError::Malformed(_) => "malformed",
            RequestError::Invalid(_) => "validation",
            RequestError::ContentType => "malformed",
            RequestError::NotFound(_) => "not_found",
        }
    }
}

impl IntoResponse for InferError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(InferError::from(ValidationError::EmptyInput).status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(InferError::Overloaded.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(InferError::Generation("x".into()).status(), StatusCode::FAILED_DEPENDENCY);
        assert_eq!(RequestError::Malformed("x".into()).status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn body_has_type() {
        let b = InferError::from(ValidationError::TopP(2.0)).body();
        assert_eq!(b.error_type, "validation");
        assert!(b.error.contains("top_p"));
    }
}
