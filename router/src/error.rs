//! Errors of the router, and the one table that maps them to HTTP status + JSON.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::shard::client::ClientError;
use crate::shard::pb::ErrorCode as ShardCode;

impl From<&ClientError> for InferError {
    fn from(e: &ClientError) -> Self {
        match e {
            ClientError::Shard { code, message, .. } => InferError::Shard { code: *code, message: message.clone() },
            ClientError::Connection(m) => InferError::Generation(format!("shard unreachable: {m}")),
        }
    }
}

/// A request that does not pass validation.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ValidationError {
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`max_new_tokens` must be strictly positive, got {0}")]
    MaxNewTokens(i64),
    #[error("`temperature` must be strictly positive, got {0}")]
    Temperature(f32),
    #[error("`temperature` must be between 0 and 2, got {0}")]
    OpenAiTemperature(f32),
    #[error("`top_p` must be > 0.0 and <= 1.0, got {0}")]
    TopP(f32),
    #[error("`top_k` must be >= 0, got {0}")]
    TopK(i64),
    #[error("`repetition_penalty` must be strictly positive, got {0}")]
    RepetitionPenalty(f32),
    #[error("`typical_p` must be > 0.0 and <= 1.0, got {0}")]
    TypicalP(f32),
    #[error("`frequency_penalty` must be >= -2.0 and <= 2.0, got {0}")]
    FrequencyPenalty(f32),
    #[error("`presence_penalty` must be >= -2.0 and <= 2.0, got {0}")]
    PresencePenalty(f32),
    #[error("`top_n_tokens` must be <= {0}, got {1}")]
    TopNTokens(u32, u32),
    #[error("`best_of` must be > 0 and <= {0}, got {1}")]
    BestOf(u32, u32),
    #[error("`best_of` > 1 requires sampling (`do_sample`, or a temperature/top_k/top_p/typical_p)")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`{0}` is not supported with streaming")]
    NotWithStream(&'static str),
    #[error("{0}")]
    Template(String),
    #[error("invalid adapter id {0:?}: a name of letters, digits, '.', '_', '-', not a path")]
    AdapterName(String),
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
    Unsupported(String),
    #[error("unknown field `{0}`")]
    UnknownField(String),
    #[error("`inputs` is {0} bytes long: more than any prompt of at most {1} tokens can be")]
    InputBytes(usize, u32),
    /// A message in the OpenAI routes' own parameter names (`error.param` names the field).
    #[error("{message}")]
    Param { message: String, param: String },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A grammar (JSON schema, regex, tools) that cannot be used: malformed, or a feature the
    /// grammar engine does not support.
    #[error("invalid `{0}`: {1}")]
    Grammar(&'static str, String),
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
    #[error("{message}")]
    Shard { code: crate::shard::pb::ErrorCode, message: String },
    #[error("request dropped by the scheduler without an answer")]
    Dropped,
    #[error("the server is not ready: {0}")]
    NotReady(String),
    #[error("the server is shutting down: the request was cut off after --shutdown-timeout")]
    ShuttingDown,
}

/// A client-side problem with the HTTP body itself.
#[derive(Debug, thiserror::Error, Clone)]
pub enum RequestError {
    #[error("malformed request body: {0}")]
    Malformed(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("expected `Content-Type: application/json`")]
    ContentType,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("request body larger than the {0}-byte limit")]
    PayloadTooLarge(usize),
    #[error("missing or wrong API key (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    #[error("the server is shutting down; not accepting new requests")]
    Draining,
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
}

/// The JSON body of every error response and SSE error event.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub error_type: String,
    /// The request field at fault (OpenAI routes only; moved into `error.param` there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// The error body of the OpenAI routes, the shape OpenAI answers with and its SDKs read (they show
/// `error.message`): `{"error": {"message", "type", "param", "code"}}`. `code` is our error type
/// (`model_not_found` for an unknown `model`, as OpenAI names it).
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiError,
}

#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct OpenAiError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    /// The same error in OpenAI's shape; `status` picks OpenAI's error type.
    pub fn openai(self, status: StatusCode) -> OpenAiErrorBody {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() && s != StatusCode::FAILED_DEPENDENCY => "invalid_request_error",
            _ => "server_error",
        };
        let code = if self.error_type == "not_found" { "model_not_found".to_string() } else { self.error_type };
        OpenAiErrorBody { error: OpenAiError { message: self.error, kind: kind.to_string(), param: self.param, code: Some(code) } }
    }
}

/// Status and error type for every error: the single mapping table.
pub trait ErrorKind {
    fn status(&self) -> StatusCode;
    fn error_type(&self) -> &'static str;
    /// The request field at fault, where one is named.
    fn param(&self) -> Option<String> {
        None
    }
    fn body(&self) -> ErrorBody
    where
        Self: std::fmt::Display,
    {
        ErrorBody { error: self.to_string(), error_type: self.error_type().to_string(), param: self.param() }
    }
}

impl ErrorKind for InferError {
    fn status(&self) -> StatusCode {
        match self {
            InferError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InferError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            InferError::Generation(_) | InferError::Dropped => StatusCode::FAILED_DEPENDENCY,
            InferError::NotReady(_) | InferError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            InferError::Shard { code, .. } => match code {
                ShardCode::OutOfMemory => StatusCode::SERVICE_UNAVAILABLE,
                ShardCode::InvalidRequest | ShardCode::BadAdapter => StatusCode::UNPROCESSABLE_ENTITY,
                ShardCode::AdapterNotFound => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::FAILED_DEPENDENCY,
            },
        }
    }
    fn error_type(&self) -> &'static str {
        match self {
            InferError::Validation(_) => "validation",
            InferError::Overloaded => "overloaded",
            InferError::Generation(_) => "generation",
            InferError::Dropped => "dropped",
            InferError::NotReady(_) | InferError::ShuttingDown => "unavailable",
            InferError::Shard { code, .. } => match code {
                ShardCode::OutOfMemory => "out_of_memory",
                ShardCode::InvalidRequest => "validation",
                ShardCode::AdapterNotFound => "adapter_not_found",
                ShardCode::BadAdapter => "bad_adapter",
                _ => "generation",
            },
        }
    }
    fn param(&self) -> Option<String> {
        match self {
            InferError::Validation(ValidationError::Param { param, .. }) => Some(param.clone()),
            InferError::Validation(ValidationError::Grammar(field, _)) => Some(field.to_string()),
            _ => None,
        }
    }
}

impl InferError {
    pub fn error_type_name(&self) -> &'static str {
        self.error_type()
    }
}

impl ErrorKind for RequestError {
    fn status(&self) -> StatusCode {
        match self {
            RequestError::Malformed(_) => StatusCode::BAD_REQUEST,
            RequestError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RequestError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestError::NotFound(_) => StatusCode::NOT_FOUND,
            RequestError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::Unauthorized => StatusCode::UNAUTHORIZED,
            RequestError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RequestError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
    fn error_type(&self) -> &'static str {
        match self {
            RequestError::Malformed(_) => "malformed",
            RequestError::Invalid(_) => "validation",
            RequestError::BadRequest(_) => "bad_request",
            RequestError::ContentType => "malformed",
            RequestError::NotFound(_) => "not_found",
            RequestError::PayloadTooLarge(_) => "payload_too_large",
            RequestError::Unauthorized => "authentication",
            RequestError::Draining => "unavailable",
            RequestError::BodyTimeout(_) => "timeout",
            RequestError::MethodNotAllowed(_) => "method_not_allowed",
        }
    }
}

// Every error answered as a response is counted here (errors inside streams are counted where
// the stream ends).
/// Seconds a client told 429 should wait before trying again.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for InferError {
    fn into_response(self) -> Response {
        crate::metrics::request_failed(self.error_type());
        let mut res = (self.status(), Json(self.body())).into_response();
        if matches!(self, InferError::Overloaded) {
            res.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        res
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        crate::metrics::request_failed(self.error_type());
        (self.status(), Json(self.body())).into_response()
    }
}

/// How long a shard may take to answer a health or listing call before it counts as not
/// answering. Health is served beside the steps, so even a busy shard answers in milliseconds.
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `call`, or fails with `NotReady` after `SHARD_TIMEOUT`.
pub async fn bounded<T, E: std::fmt::Display>(what: &str, call: impl std::future::Future<Output = Result<T, E>>) -> Result<T, InferError> {
    match tokio::time::timeout(SHARD_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(InferError::NotReady(format!("{what}: {e}"))),
        Err(_) => Err(InferError::NotReady(format!("{what}: a shard did not answer within {} s", SHARD_TIMEOUT.as_secs()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_names_the_message_type_and_code() {
        let body = RequestError::NotFound("the model `x` does not exist".into()).body().openai(StatusCode::NOT_FOUND);
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(v["error"]["message"], "not found: the model `x` does not exist");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["param"].is_null());
        let kind = |b: ErrorBody, s: StatusCode| b.openai(s).error.kind;
        assert_eq!(kind(RequestError::Unauthorized.body(), StatusCode::UNAUTHORIZED), "authentication_error");
        assert_eq!(kind(InferError::Overloaded.body(), StatusCode::TOO_MANY_REQUESTS), "rate_limit_error");
        assert_eq!(kind(InferError::Dropped.body(), StatusCode::FAILED_DEPENDENCY), "server_error");
        assert_eq!(InferError::Overloaded.body().openai(StatusCode::TOO_MANY_REQUESTS).error.code.as_deref(), Some("overloaded"));
    }

    #[test]
    fn statuses() {
        assert_eq!(InferError::from(ValidationError::EmptyInput).status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(InferError::Overloaded.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(InferError::Generation("x".into()).status(), StatusCode::FAILED_DEPENDENCY);
        assert_eq!(RequestError::Malformed("x".into()).status(), StatusCode::BAD_REQUEST);
        assert_eq!(RequestError::PayloadTooLarge(1).status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(RequestError::Unauthorized.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn shard_codes_map_to_distinct_statuses() {
        let e = |code| InferError::from(&ClientError::Shard { code, message: "m".into(), request_ids: vec![] });
        assert_eq!(e(ShardCode::OutOfMemory).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e(ShardCode::InvalidRequest).status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e(ShardCode::Internal).status(), StatusCode::FAILED_DEPENDENCY);
        assert_eq!(e(ShardCode::OutOfMemory).error_type(), "out_of_memory");
    }

    #[test]
    fn body_has_type() {
        let b = InferError::from(ValidationError::TopP(2.0)).body();
        assert_eq!(b.error_type, "validation");
        assert!(b.error.contains("top_p"));
    }
}
