//! HTTP routes (axum). Handlers are thin: parse the body, call `Infer`, shape the answer.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use utoipa::OpenApi;

use crate::api::{
    BestOfSequence, Details, FinishReason, GenerateParameters, GenerateRequest, GenerateResponse, Info, PrefillToken,
    SimpleToken, StreamDetails, StreamResponse, Token,
};
use crate::error::{ErrorBody, ErrorKind, InferError, RequestError, ValidationError};
use crate::infer::{EndDetails, InferResponse, InferStreamEvent};
use crate::http::{openai, AppState, JsonBody};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tessera", description = "TGI- and OpenAI-compatible text generation server"),
    paths(compat_generate, generate, generate_stream, tokenize, health, live, info, metrics,
          openai::completions, openai::chat_completions, openai::models, load_lora_adapter, unload_lora_adapter),
    components(schemas(GenerateRequest, GenerateParameters, GenerateResponse, Details, BestOfSequence, PrefillToken,
                        Token, FinishReason, StreamResponse, StreamDetails, SimpleToken, Info, ErrorBody,
                        crate::error::OpenAiErrorBody, crate::error::OpenAiError,
                        openai::CompletionRequest, openai::CompletionResponse, openai::ChatCompletionRequest,
                        openai::ChatCompletionResponse, openai::ChatCompletionChunk, openai::ModelList,
                        LoadLoraAdapterRequest, UnloadLoraAdapterRequest)),
    tags((name = "Text Generation Inference", description = "TGI routes"), (name = "OpenAI", description = "OpenAI-compatible routes"))
)]
pub struct ApiDoc;

pub fn app(state: AppState) -> Router {
    let limit = state.payload_limit;
    let cors = cors_layer(&state.cors_allow_origin);
    let router = Router::new()
        .route("/", post(compat_generate))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/tokenize", post(tokenize))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/api-doc/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(openai_errors))
        .with_state(state);
    // Outermost: a browser's preflight (OPTIONS, no API key) is answered before the guard.
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// CORS for `--cors-allow-origin` (TGI's flag): GET and POST from the listed origins (`*`: any),
/// with the headers our clients send; None when no origin is listed.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o.trim()).ok()))
    };
    Some(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([axum::http::header::CONTENT_TYPE, axum::http::header::AUTHORIZATION, axum::http::header::ACCEPT]))
}

/// The OpenAI routes answer errors in OpenAI's shape (`openai::is_route`), whichever layer made
/// them (the guard's 401 and 503 included); the other routes keep TGI's flat body.
async fn openai_errors(req: Request, next: Next) -> Response {
    let openai = openai::is_route(req.uri().path());
    let res = next.run(req).await;
    if !openai || !(res.status().is_client_error() || res.status().is_server_error()) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let status = parts.status;
    let flat = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(bytes) => match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(flat) => flat,
            Err(_) => return Response::from_parts(parts, axum::body::Body::from(bytes)),
        },
        Err(_) => ErrorBody { error: "error body unreadable".into(), error_type: "generation".into(), param: None },
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(serde_json::to_vec(&flat.openai(status)).unwrap_or_default()))
}

/// Reads the whole request body before the handler runs, within `--http-body-timeout` and
/// `--payload-limit`: a client trickling its body gets 408 instead of holding a connection.
async fn read_body(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(s.body_timeout, axum::body::to_bytes(body, s.payload_limit)).await {
        Err(_) => {
            let mut res = RequestError::BodyTimeout(s.body_timeout.as_secs()).into_response();
            res.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            res
        }
        Ok(Err(e)) if is_length_limit(&e) => RequestError::PayloadTooLarge(s.payload_limit).into_response(),
        Ok(Err(e)) => RequestError::Malformed(format!("reading the body: {e}")).into_response(),
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await,
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// API key on every route but the probes (/health, /live); while draining, or while a shard does not answer, new
/// POSTs get 503.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path != "/health" && path != "/live" {
        if let Some(key) = &s.api_key {
            let ok = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|v| constant_time_eq(v.trim().as_bytes(), key.as_bytes()));
            if !ok {
                return RequestError::Unauthorized.into_response();
            }
        }
    }
    if req.method() == Method::POST {
        if s.draining.load(Ordering::SeqCst) {
            return RequestError::Draining.into_response();
        }
        if !s.health.ok() {
            return InferError::NotReady("a shard is not answering".into()).into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn details(r: &InferResponse, best_of: Vec<InferResponse>) -> Details {
    let d = &r.details;
    Details {
        finish_reason: d.finish_reason,
        generated_tokens: d.generated_tokens,
        seed: d.seed,
        cached_tokens: d.cached_tokens,
        prefill: d.prefill.clone(),
        tokens: d.tokens.clone(),
        top_tokens: d.top_tokens.clone(),
        best_of_sequences: (!best_of.is_empty()).then(|| {
            best_of
                .into_iter()
                .map(|o| BestOfSequence {
                    generated_text: o.generated_text,
                    finish_reason: o.details.finish_reason,
                    generated_tokens: o.details.generated_tokens,
                    seed: o.details.seed,
                    prefill: o.details.prefill,
                    tokens: o.details.tokens,
                    top_tokens: o.details.top_tokens,
                })
                .collect()
        }),
    }
}

async fn generate_inner(s: &AppState, req: GenerateRequest) -> Result<(HeaderMap, GenerateResponse), InferError> {
    let want_details = req.parameters.details || req.parameters.decoder_input_details;
    let (best, others) = s.infer.generate(req).await?;
    let headers = timing_headers(&best.details);
    let details = want_details.then(|| details(&best, others));
    Ok((headers, GenerateResponse { generated_text: best.generated_text, details }))
}

/// `POST /` (TGI compatibility): `stream` picks SSE; otherwise a one-element list.
#[utoipa::path(post, path = "/", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "A list with one generation, or SSE events when stream", body = Vec<GenerateResponse>),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 424, body = ErrorBody), (status = 429, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn compat_generate(State(s): State<AppState>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    if req.stream {
        return stream_response(s, req).await;
    }
    match generate_inner(&s, req).await {
        Ok((h, body)) => (h, Json(vec![body])).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /generate`
#[utoipa::path(post, path = "/generate", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, body = GenerateResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 424, body = ErrorBody),
              (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn generate(State(s): State<AppState>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    match generate_inner(&s, req).await {
        Ok((h, body)) => (h, Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
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
    put("x-compute-type", "1-shard".into());
    put("x-compute-time", format!("{:.6}", total.as_secs_f64()));
    put("x-compute-characters", "0".into());
    put("x-total-time", total.as_millis().to_string());
    put("x-validation-time", "0".into());
    put("x-queue-time", queue.as_millis().to_string());
    put("x-inference-time", inference.as_millis().to_string());
    put("x-time-per-token", per_token.as_millis().to_string());
    put("x-prompt-tokens", d.input_length.to_string());
    put("x-generated-tokens", d.generated_tokens.to_string());
    h
}

/// `POST /generate_stream`
#[utoipa::path(post, path = "/generate_stream", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, description = "Server-sent events, one StreamResponse per token", body = StreamResponse,
               content_type = "text/event-stream"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn generate_stream(State(s): State<AppState>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    stream_response(s, req).await
}

async fn stream_response(s: AppState, req: GenerateRequest) -> Response {
    if req.parameters.best_of.is_some_and(|b| b > 1) {
        return InferError::from(ValidationError::NotWithStream("best_of")).into_response();
    }
    if req.parameters.decoder_input_details {
        return InferError::from(ValidationError::NotWithStream("decoder_input_details")).into_response();
    }
    let want_details = req.parameters.details;
    let (_request, stream) = match s.infer.generate_stream(req).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let mut index = 0u32;
    let events = stream.map(move |ev| -> Result<Event, Infallible> {
        index += 1;
        let event = match ev {
            Ok(InferStreamEvent::Token { token, top_tokens }) => {
                StreamResponse { index, token, top_tokens, generated_text: None, details: None }
            }
            Ok(InferStreamEvent::End { token, top_tokens, generated_text, details }) => StreamResponse {
                index,
                token,
                top_tokens,
                generated_text: Some(generated_text),
                details: want_details.then_some(StreamDetails {
                    finish_reason: details.finish_reason,
                    generated_tokens: details.generated_tokens,
                    seed: details.seed,
                    input_length: details.input_length,
                    cached_tokens: details.cached_tokens,
                }),
            },
            Err(e) => return Ok(Event::default().json_data(e.body()).unwrap_or_default()),
        };
        Ok(Event::default().json_data(event).unwrap_or_default())
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// `POST /tokenize`: the prompt's tokens with their character spans.
#[utoipa::path(post, path = "/tokenize", tag = "Text Generation Inference", request_body = GenerateRequest,
    responses((status = 200, body = Vec<SimpleToken>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn tokenize(State(s): State<AppState>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    // Tokenizing is the costly part here: it counts against the concurrency limit too.
    let _permit = match s.infer.permit() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let inputs = req.inputs.clone();
    match s.infer.validation().encode(req.inputs).await {
        Ok(enc) => {
            let tokens: Vec<SimpleToken> = enc
                .get_ids()
                .iter()
                .zip(enc.get_offsets())
                .map(|(&id, &(start, stop))| SimpleToken {
                    id,
                    text: inputs.get(start..stop).unwrap_or("").to_string(),
                    start,
                    stop,
                })
                .collect();
            Json(tokens).into_response()
        }
        Err(e) => InferError::from(e).into_response(),
    }
}

/// `GET /health`: 200 when every shard answers; 503 while draining or when a shard does not.
#[utoipa::path(get, path = "/health", tag = "Text Generation Inference",
    responses((status = 200, description = "Ready"), (status = 503, body = ErrorBody)))]
async fn health(State(s): State<AppState>) -> Response {
    if s.draining.load(Ordering::SeqCst) {
        return RequestError::Draining.into_response();
    }
    match s.health.check().await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /live`: 200 while the router runs, draining included. Kubernetes' liveness probe: a drain
/// is not a failure, and a shard that dies or hangs stops the launcher, which ends the container.
/// Readiness is /health.
#[utoipa::path(get, path = "/live", tag = "Text Generation Inference", responses((status = 200, description = "Alive")))]
async fn live() -> StatusCode {
    StatusCode::OK
}

/// `GET /info`
#[utoipa::path(get, path = "/info", tag = "Text Generation Inference", responses((status = 200, body = Info),
    (status = 401, body = ErrorBody), (status = 503, description = "A shard does not answer", body = ErrorBody)))]
async fn info(State(s): State<AppState>) -> Response {
    let adapters = match s.infer.adapters().list().await {
        Ok(list) => list.into_iter().map(|a| a.name).collect(),
        Err(e) => return e.into_response(),
    };
    let stats = s.allocator.stats();
    let mut info = (*s.info).clone();
    info.kv_blocks_total = stats.total;
    info.kv_blocks_free = stats.free;
    info.kv_blocks_used = stats.total - stats.free;
    info.kv_blocks_cached = stats.cached;
    info.queue_size = s.infer.queue().len();
    info.adapters = adapters;
    Json(info).into_response()
}

/// Body of `POST /v1/load_lora_adapter` (vLLM's names).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct LoadLoraAdapterRequest {
    /// Name requests use (`adapter_id`, or `model` on the OpenAI routes).
    pub lora_name: String,
    /// PEFT directory inside the server's `--adapter-source` (relative to it, or absolute);
    /// default: the directory named `lora_name` there.
    #[serde(default)]
    pub lora_path: Option<String>,
}

/// Body of `POST /v1/unload_lora_adapter`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct UnloadLoraAdapterRequest {
    pub lora_name: String,
    /// Accepted for vLLM compatibility; ignored.
    #[serde(default)]
    pub lora_int_id: Option<i64>,
}

/// Admin routes answer shard verdicts with REST statuses: a path outside the adapter source is a
/// bad request, a missing one not found, an adapter that does not fit the model unprocessable.
fn admin_error(e: InferError) -> Response {
    use crate::shard::pb::ErrorCode;
    match &e {
        InferError::Shard { code: ErrorCode::InvalidRequest, message } => RequestError::BadRequest(message.clone()).into_response(),
        InferError::Shard { code: ErrorCode::AdapterNotFound, message } => RequestError::NotFound(message.clone()).into_response(),
        _ => e.into_response(),
    }
}

/// `POST /v1/load_lora_adapter`: validate and register an adapter, then load it in the background.
#[utoipa::path(post, path = "/v1/load_lora_adapter", tag = "OpenAI", request_body = LoadLoraAdapterRequest,
    responses((status = 200, description = "Registered", body = String, content_type = "text/plain"),
              (status = 400, description = "Malformed body, or a path outside the adapter source", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, description = "No adapter at that path", body = ErrorBody),
              (status = 422, description = "Invalid name, or the adapter does not fit the base model", body = ErrorBody)))]
async fn load_lora_adapter(State(s): State<AppState>, JsonBody(req): JsonBody<LoadLoraAdapterRequest>) -> Response {
    if !crate::infer::validation::valid_adapter_name(&req.lora_name) {
        return InferError::from(ValidationError::AdapterName(req.lora_name)).into_response();
    }
    match s.infer.adapters().register(&req.lora_name, req.lora_path).await {
        Ok(()) => (StatusCode::OK, format!("Success: LoRA adapter '{}' added successfully.", req.lora_name)).into_response(),
        Err(e) => admin_error(e),
    }
}

/// `POST /v1/unload_lora_adapter`: refuse new requests for an adapter and free it once its
/// running requests finish.
#[utoipa::path(post, path = "/v1/unload_lora_adapter", tag = "OpenAI", request_body = UnloadLoraAdapterRequest,
    responses((status = 200, description = "Unloaded", body = String, content_type = "text/plain"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, description = "No such adapter", body = ErrorBody)))]
async fn unload_lora_adapter(State(s): State<AppState>, JsonBody(req): JsonBody<UnloadLoraAdapterRequest>) -> Response {
    match s.infer.adapters().unregister(&req.lora_name).await {
        Ok(()) => (StatusCode::OK, format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name)).into_response(),
        Err(None) => RequestError::NotFound(format!("the LoRA adapter '{}' is not loaded", req.lora_name)).into_response(),
        Err(Some(e)) => admin_error(e),
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "Text Generation Inference",
    responses((status = 200, description = "Prometheus metrics", body = String, content_type = "text/plain"),
              (status = 401, body = ErrorBody)))]
async fn metrics(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => RequestError::NotFound("/metrics (no recorder installed)".into()).into_response(),
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found(uri: axum::http::Uri) -> Response {
    RequestError::NotFound(uri.path().to_string()).into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    RequestError::MethodNotAllowed(method.to_string()).into_response()
}
