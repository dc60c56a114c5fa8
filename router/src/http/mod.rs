//! The HTTP front door: routes (`server`: TGI's; `openai`: OpenAI's, with its types), the accept
//! loop, health; the state and the JSON body extractor every route shares.

pub mod accept;
pub mod health;
pub mod openai;
pub mod server;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::Json;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;

use crate::api::Info;
use crate::engine::kv::BlockAllocator;
use crate::error::RequestError;
use crate::http::health::ShardHealth;
use crate::infer::chat::ChatTemplate;
use crate::infer::Infer;

#[derive(Clone)]
pub struct AppState {
    pub infer: Infer,
    pub allocator: BlockAllocator,
    pub health: ShardHealth,
    pub info: Arc<Info>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub metrics: Option<PrometheusHandle>,
    pub api_key: Option<Arc<String>>,
    pub payload_limit: usize,
    /// How long a client may take to send a request body.
    pub body_timeout: Duration,
    /// Set on SIGTERM: new work gets 503 while in-flight requests finish.
    pub draining: Arc<AtomicBool>,
    /// Origins allowed to call from a browser (`--cors-allow-origin`); empty: no CORS headers.
    pub cors_allow_origin: Arc<Vec<String>>,
}

/// A JSON request body, or our error for it (400 syntax, 415 content type, 422 shape, 413 size):
/// the one place axum's rejections become `RequestError`s.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = RequestError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(r)) => Ok(JsonBody(r)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(RequestError::PayloadTooLarge(state.payload_limit)),
            Err(JsonRejection::JsonDataError(e)) => Err(RequestError::Invalid(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(RequestError::ContentType),
            Err(e) => Err(RequestError::Malformed(e.body_text())),
        }
    }
}

