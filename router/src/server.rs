//! HTTP routes (axum). Handlers are thin: parse the body, call `Infer`, shape the answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::api::{Details, GenerateRequest, GenerateResponse, Info, StreamDetails, StreamResponse};
use crate::block_allocator::BlockAllocator;
use crate::client::ShardedClient;
use crate::error::{ErrorKind, RequestError};
use crate::infer::{EndDetails, Infer, InferStreamEvent};

#[derive(Clone)]
pub struct AppState {
    pub infer: Infer,
    pub allocator: BlockAllocator,
    pub client: Arc<Mutex<ShardedClient>>,
    pub info: Arc<Info>,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/health", get(health))
        .route("/info", get(info))
        .fallback(not_found)
        .with_state(state)
}

fn parse(payload: Result<Json<GenerateRequest>, JsonRejection>) -> Result<GenerateRequest, RequestError> {
    match payload {
        Ok(Json(r)) => Ok(r),
        Err(JsonRejection::JsonDataError(e)) => Err(RequestError::Invalid(e.body_text())),
        Err(JsonRejection::MissingJsonContentType(_)) => Err(RequestError::ContentType),
        Err(e) => Err(RequestError::Malformed(e.body_text())),
    }
}

async fn generate(State(s): State<AppState>, payload: Result<Json<GenerateRequest>, JsonRejection>) -> Response {
    let req = match parse(payload) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match s.infer.generate(req).await {
        Ok(r) => {
            let headers = timing_headers(&r.details);
            let details = r.details;
            let body = GenerateResponse {
                generated_text: r.generated_text,
                details: s_details(&details),
            };
            (headers, Json(body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

fn s_details(d: &EndDetails) -> Option<Details> {
    Some(Details {
        finish_reason: d.finish_reason,
        generated_tokens: d.generated_tokens,
        seed: d.seed,
        prefill: vec![],
        tokens: d.tokens.clone(),
    })
}

/// TGI's timing headers.
fn timing_headers(d: &EndDetails) -> HeaderMap {
    let queue = d.started.duration_since(d.queued);
    let inference = d.finished.duration_since(d.started);
    let total = d.finished.duration_since(d.queued);
    let per_token = inference / d.generated_tokens.max(1);
    let mut h = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put("x-compute-type", "gpu+optimized".into());
    put("x-compute-time", format!("{:.6}", total.as_secs_f64()));
    put("x-total-time", total.as_millis().to_string());
    put("x-queue-time", queue.as_millis().to_string());
    put("x-inference-time", inference.as_millis().to_string());
    put("x-time-per-token", per_token.as_millis().to_string());
    put("x-prompt-tokens", d.input_length.to_string());
    put("x-generated-tokens", d.generated_tokens.to_string());
    h
}

async fn generate_stream(State(s): State<AppState>, payload: Result<Json<GenerateRequest>, JsonRejection>) -> Response {
    let req = match parse(payload) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let want_details = req.parameters.details;
    let (_request, stream) = match s.infer.generate_stream(req).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let mut index = 0u32;
    let events = stream.map(move |ev| -> Result<Event, Infallible> {
        index += 1;
        let event = match ev {
            Ok(InferStreamEvent::Token(token)) => {
                StreamResponse { index, token, top_tokens: vec![], generated_text: None, details: None }
            }
            Ok(InferStreamEvent::End { token, generated_text, details }) => StreamResponse {
                index,
                token,
                top_tokens: vec![],
                generated_text: Some(generated_text),
                details: want_details.then_some(StreamDetails {
                    finish_reason: details.finish_reason,
                    generated_tokens: details.generated_tokens,
                    seed: details.seed,
                    input_length: details.input_length,
                }),
            },
            Err(e) => return Ok(Event::default().json_data(e.body()).unwrap_or_default()),
        };
        Ok(Event::default().json_data(event).unwrap_or_default())
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    match s.client.lock().await.health().await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => crate::error::InferError::NotReady(e.to_string()).into_response(),
    }
}

async fn info(State(s): State<AppState>) -> Json<Info> {
    let stats = s.allocator.stats().await;
    let mut info = (*s.info).clone();
    info.kv_blocks_total = stats.total;
    info.kv_blocks_free = stats.free;
    info.queue_size = s.infer.queue().len().await;
    Json(info)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    RequestError::NotFound(uri.path().to_string()).into_response()
}
