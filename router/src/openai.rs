//! OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.
//! Requests become TGI `GenerateRequest`s and go through the same validation and queue.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{FinishReason, GenerateParameters, GenerateRequest, Token};
use crate::chat::TemplateMessage;
use crate::detokenize::StopTrimmer;
use crate::error::{ErrorKind, InferError};
use crate::infer::{InferResponse, InferStreamEvent};
use crate::server::{parse_json, AppState};

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both OpenAI routes.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct OpenAiSampling {
    /// 0 means greedy; default 1.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// Choices to return (up to --max-best-of).
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StringOrList>,
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    /// Extension (vLLM): keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// Extension (vLLM): multiplicative repetition penalty.
    pub repetition_penalty: Option<f32>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// One prompt or several (one choice set per prompt).
    pub prompt: StringOrList,
    /// Tokens to generate (default 16).
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// Alternatives per token to return (0-5).
    #[schema(minimum = 0, maximum = 5)]
    pub logprobs: Option<u32>,
    /// Prepend the prompt to the text.
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: OpenAiSampling,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    /// Return logprobs of the output tokens.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0-5), with `logprobs`.
    #[schema(minimum = 0, maximum = 5)]
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: OpenAiSampling,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<std::collections::HashMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// Adapters: the base model they apply to (as vLLM lists LoRA modules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

fn fingerprint() -> String {
    format!("tessera-{}", env!("CARGO_PKG_VERSION"))
}

fn finish_reason(f: FinishReason) -> String {
    match f {
        FinishReason::Length => "length".into(),
        FinishReason::EosToken | FinishReason::StopSequence => "stop".into(),
    }
}

/// OpenAI sampling fields -> TGI parameters. Temperature 0 means greedy.
fn to_parameters(s: &OpenAiSampling, max_new_tokens: Option<i64>, top_n: u32) -> Result<GenerateParameters, InferError> {
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(crate::error::ValidationError::OpenAiTemperature(temperature).into());
    }
    let greedy = temperature == 0.0;
    Ok(GenerateParameters {
        max_new_tokens,
        do_sample: Some(!greedy),
        temperature: (!greedy).then_some(temperature),
        top_p: if greedy { None } else { s.top_p },
        top_k: if greedy { None } else { s.top_k },
        repetition_penalty: s.repetition_penalty,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        seed: s.seed,
        stop: s.stop.clone().map(StringOrList::into_vec).unwrap_or_default(),
        details: true,
        top_n_tokens: (top_n > 0).then_some(top_n),
        ..Default::default()
    })
}

fn check_n(state: &AppState, n: Option<u32>) -> Result<u32, InferError> {
    let n = n.unwrap_or(1);
    let max = state.infer.validation().limits().max_best_of;
    if n == 0 || n > max {
        return Err(crate::error::ValidationError::BestOf(max, n).into());
    }
    Ok(n)
}

fn text_before_stop(r: &InferResponse) -> String {
    match r.details.stop_at {
        Some(at) => r.generated_text[..at].to_string(),
        None => r.generated_text.clone(),
    }
}

fn usage(prompt: u32, completion: u32) -> Usage {
    Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
}

fn completion_logprobs(tokens: &[Token], tops: &[Vec<Token>], offset0: usize) -> CompletionLogprobs {
    let mut offset = offset0;
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.text.len();
    }
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.text.clone()).collect(),
        token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
        top_logprobs: tops.iter().map(|alts| alts.iter().map(|a| (a.text.clone(), a.logprob)).collect()).collect(),
        text_offset,
    }
}

fn chat_logprobs(tokens: &[Token], tops: &[Vec<Token>]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .filter(|t| !t.special)
        .enumerate()
        .map(|(i, t)| TokenLogprob {
            token: t.text.clone(),
            logprob: t.logprob,
            bytes: t.text.as_bytes().to_vec(),
            top_logprobs: tops
                .get(i)
                .map(|alts| alts.iter().map(|a| TopLogprob { token: a.text.clone(), logprob: a.logprob, bytes: a.text.as_bytes().to_vec() }).collect())
                .unwrap_or_default(),
        })
        .collect();
    ChatLogprobs { content }
}

/// `POST /v1/completions`
#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI", request_body = CompletionRequest,
    responses((status = 200, description = "Completion (or SSE chunks when stream)", body = CompletionResponse),
              (status = 400, body = crate::error::OpenAiErrorBody), (status = 401, body = crate::error::OpenAiErrorBody),
              (status = 404, description = "`model` is neither the base model nor a known adapter", body = crate::error::OpenAiErrorBody),
              (status = 413, body = crate::error::OpenAiErrorBody), (status = 422, body = crate::error::OpenAiErrorBody),
              (status = 424, body = crate::error::OpenAiErrorBody), (status = 429, body = crate::error::OpenAiErrorBody),
              (status = 503, body = crate::error::OpenAiErrorBody)))]
pub async fn completions(State(s): State<AppState>, payload: Result<Json<CompletionRequest>, JsonRejection>) -> Response {
    let req = match parse_json(payload, s.payload_limit) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let model = req.model.clone();
    match completions_inner(s, req).await {
        Ok(r) => r,
        Err(e) => model_error(e, model.as_deref()),
    }
}

async fn completions_inner(s: AppState, req: CompletionRequest) -> Result<Response, InferError> {
    let n = check_n(&s, req.sampling.n)?;
    let top_n = req.logprobs.unwrap_or(0);
    let mut params = to_parameters(&req.sampling, Some(req.max_tokens.unwrap_or(16)), top_n)?;
    params.adapter_id = adapter_for_model(&s, req.model.as_deref())?;
    let prompts = req.prompt.clone().into_vec();
    if prompts.is_empty() {
        return Err(crate::error::ValidationError::EmptyInput.into());
    }
    let model = req.model.clone().unwrap_or_else(|| s.info.model_id.clone());
    let id = new_id("cmpl");
    let created = now();
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let mut streams = vec![];
        for (pi, prompt) in prompts.iter().enumerate() {
            let gen = GenerateRequest { inputs: prompt.clone(), parameters: params.clone(), stream: true };
            for (j, (valid, st)) in s.infer.generate_streams(gen, Some(n)).await?.into_iter().enumerate() {
                let index = (pi as u32) * n + j as u32;
                let echo = req.echo.then(|| valid.inputs.clone());
                streams.push(openai_choice_stream(st, index, valid.stopping.stop_sequences.clone(), echo, valid.input_length()));
            }
        }
        let logprobs = req.logprobs.is_some();
        let (id2, model2) = (id.clone(), model.clone());
        let to_chunk = move |p: ChoicePiece| {
            serde_json::to_value(CompletionResponse {
                id: id2.clone(),
                object: "text_completion".into(),
                created,
                model: model2.clone(),
                system_fingerprint: fingerprint(),
                choices: vec![CompletionChoice {
                    index: p.index,
                    text: p.text,
                    logprobs: logprobs.then(|| completion_logprobs(&p.tokens, &p.tops, 0)),
                    finish_reason: p.finish.map(finish_reason),
                }],
                usage: None,
            })
            .unwrap_or_default()
        };
        let usage_chunk = move |u: Usage| {
            serde_json::to_value(CompletionResponse {
                id: id.clone(),
                object: "text_completion".into(),
                created,
                model: model.clone(),
                system_fingerprint: fingerprint(),
                choices: vec![],
                usage: Some(u),
            })
            .unwrap_or_default()
        };
        return Ok(sse_response(vec![], stream::select_all(streams), to_chunk, include_usage.then_some(usage_chunk), n));
    }
    let mut choices = vec![];
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (pi, prompt) in prompts.iter().enumerate() {
        let gen = GenerateRequest { inputs: prompt.clone(), parameters: params.clone(), stream: false };
        let all = s.infer.generate_n(gen, Some(n)).await?;
        for (j, r) in all.into_iter().enumerate() {
            prompt_tokens = r.details.input_length;
            completion_tokens += r.details.generated_tokens;
            let mut text = text_before_stop(&r);
            if req.echo {
                text = format!("{prompt}{text}");
            }
            choices.push(CompletionChoice {
                index: (pi as u32) * n + j as u32,
                text,
                logprobs: req.logprobs.is_some().then(|| completion_logprobs(&r.details.tokens, &r.details.top_tokens, if req.echo { prompt.len() } else { 0 })),
                finish_reason: Some(finish_reason(r.details.finish_reason)),
            });
        }
    }
    let body = CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: Some(usage(prompt_tokens * prompts.len() as u32, completion_tokens)),
    };
    Ok(Json(body).into_response())
}

/// `POST /v1/chat/completions`
#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI", request_body = ChatCompletionRequest,
    responses((status = 200, description = "Chat completion (or SSE chunks when stream)", body = ChatCompletionResponse),
              (status = 400, body = crate::error::OpenAiErrorBody), (status = 401, body = crate::error::OpenAiErrorBody),
              (status = 404, description = "`model` is neither the base model nor a known adapter", body = crate::error::OpenAiErrorBody),
              (status = 413, body = crate::error::OpenAiErrorBody), (status = 422, body = crate::error::OpenAiErrorBody),
              (status = 424, body = crate::error::OpenAiErrorBody), (status = 429, body = crate::error::OpenAiErrorBody),
              (status = 503, body = crate::error::OpenAiErrorBody)))]
pub async fn chat_completions(State(s): State<AppState>, payload: Result<Json<ChatCompletionRequest>, JsonRejection>) -> Response {
    let req = match parse_json(payload, s.payload_limit) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let model = req.model.clone();
    match chat_inner(s, req).await {
        Ok(r) => r,
        Err(e) => model_error(e, model.as_deref()),
    }
}

fn render_chat(s: &AppState, messages: &[ChatMessage]) -> Result<String, InferError> {
    let template = s.chat_template.as_ref().ok_or_else(|| {
        InferError::Validation(crate::error::ValidationError::Template("this model has no chat template".into()))
    })?;
    if messages.is_empty() {
        return Err(crate::error::ValidationError::Template("`messages` cannot be empty".into()).into());
    }
    let msgs: Vec<TemplateMessage> = messages
        .iter()
        .map(|m| TemplateMessage {
            role: m.role.clone(),
            content: match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => parts.iter().filter(|p| p.kind == "text").filter_map(|p| p.text.clone()).collect::<Vec<_>>().join(""),
            },
        })
        .collect();
    template.apply(&msgs, true).map_err(|e| crate::error::ValidationError::Template(e).into())
}

async fn chat_inner(s: AppState, req: ChatCompletionRequest) -> Result<Response, InferError> {
    let n = check_n(&s, req.sampling.n)?;
    let top_n = if req.logprobs { req.top_logprobs.unwrap_or(0) } else { 0 };
    let max = req.max_completion_tokens.or(req.max_tokens);
    let mut params = to_parameters(&req.sampling, max, top_n)?;
    params.adapter_id = adapter_for_model(&s, req.model.as_deref())?;
    let prompt = render_chat(&s, &req.messages)?;
    let model = req.model.clone().unwrap_or_else(|| s.info.model_id.clone());
    let id = new_id("chatcmpl");
    let created = now();
    let gen = GenerateRequest { inputs: prompt, parameters: params, stream: req.sampling.stream };
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let mut streams = vec![];
        for (j, (valid, st)) in s.infer.generate_streams(gen, Some(n)).await?.into_iter().enumerate() {
            streams.push(openai_choice_stream(st, j as u32, valid.stopping.stop_sequences.clone(), None, valid.input_length()));
        }
        let chunk = {
            let (id, model) = (id.clone(), model.clone());
            move |choices: Vec<ChunkChoice>, usage: Option<Usage>| {
                serde_json::to_value(ChatCompletionChunk {
                    id: id.clone(),
                    object: "chat.completion.chunk".into(),
                    created,
                    model: model.clone(),
                    system_fingerprint: fingerprint(),
                    choices,
                    usage,
                })
                .unwrap_or_default()
            }
        };
        // The first chunk of each choice announces the role.
        let roles = (0..n)
            .map(|i| chunk(vec![ChunkChoice { index: i, delta: Delta { role: Some("assistant".into()), content: Some(String::new()) }, logprobs: None, finish_reason: None }], None))
            .collect();
        let logprobs = req.logprobs;
        let chunk2 = chunk.clone();
        let to_chunk = move |p: ChoicePiece| {
            chunk2(
                vec![ChunkChoice {
                    index: p.index,
                    delta: Delta { role: None, content: (!p.text.is_empty() || p.finish.is_none()).then_some(p.text) },
                    logprobs: logprobs.then(|| chat_logprobs(&p.tokens, &p.tops)),
                    finish_reason: p.finish.map(finish_reason),
                }],
                None,
            )
        };
        let usage_chunk = move |u: Usage| chunk(vec![], Some(u));
        return Ok(sse_response(roles, stream::select_all(streams), to_chunk, include_usage.then_some(usage_chunk), n));
    }
    let all = s.infer.generate_n(gen, Some(n)).await?;
    let prompt_tokens = all.first().map_or(0, |r| r.details.input_length);
    let completion_tokens = all.iter().map(|r| r.details.generated_tokens).sum();
    let choices = all
        .iter()
        .enumerate()
        .map(|(i, r)| ChatChoice {
            index: i as u32,
            message: AssistantMessage { role: "assistant".into(), content: text_before_stop(r) },
            logprobs: req.logprobs.then(|| chat_logprobs(&r.details.tokens, &r.details.top_tokens)),
            finish_reason: finish_reason(r.details.finish_reason),
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: usage(prompt_tokens, completion_tokens),
    })
    .into_response())
}

/// A piece of one choice's stream: text ready to send (stop sequences held back and cut).
struct ChoicePiece {
    index: u32,
    text: String,
    tokens: Vec<Token>,
    tops: Vec<Vec<Token>>,
    finish: Option<FinishReason>,
    prompt_tokens: u32,
    generated: u32,
}

fn openai_choice_stream(
    st: crate::infer::ResponseStream,
    index: u32,
    stops: Vec<String>,
    echo: Option<String>,
    prompt_tokens: u32,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<ChoicePiece, InferError>> + Send>> {
    Box::pin(async_stream::stream! {
        let mut trimmer = StopTrimmer::new(stops);
        let mut first = true;
        let mut generated = 0u32;
        futures::pin_mut!(st);
        while let Some(ev) = st.next().await {
            let (token, tops, end) = match ev {
                Err(e) => { yield Err(e); return; }
                Ok(InferStreamEvent::Token { token, top_tokens }) => (token, top_tokens, None),
                Ok(InferStreamEvent::End { token, top_tokens, details, .. }) => (token, top_tokens, Some(details)),
            };
            generated += 1;
            let mut text = if token.special { String::new() } else { trimmer.push(&token.text) };
            if first {
                if let Some(e) = &echo { text = format!("{e}{text}"); }
                first = false;
            }
            let finish = end.as_ref().map(|d| d.finish_reason);
            if finish.is_some() {
                text.push_str(&trimmer.finish());
            }
            let tops = if tops.is_empty() { vec![] } else { vec![tops] };
            yield Ok(ChoicePiece { index, text, tokens: vec![token], tops, finish, prompt_tokens, generated });
            if finish.is_some() { return; }
        }
    })
}

/// The SSE body of an OpenAI stream: `first` chunks, one chunk per piece, the usage chunk if
/// asked for (prompt tokens counted once per prompt, i.e. per `n` choices), then `[DONE]`.
fn sse_response<P, F, U>(first: Vec<serde_json::Value>, pieces: P, mut to_chunk: F, usage_chunk: Option<U>, n: u32) -> Response
where
    P: futures::Stream<Item = Result<ChoicePiece, InferError>> + Send + 'static,
    F: FnMut(ChoicePiece) -> serde_json::Value + Send + 'static,
    U: Fn(Usage) -> serde_json::Value + Send + 'static,
{
    let events = async_stream::stream! {
        for c in first {
            yield Ok::<_, Infallible>(Event::default().json_data(c).unwrap_or_default());
        }
        let mut prompt = std::collections::HashMap::new();
        let mut generated = std::collections::HashMap::new();
        futures::pin_mut!(pieces);
        while let Some(piece) = pieces.next().await {
            match piece {
                Ok(p) => {
                    if p.index % n.max(1) == 0 {
                        prompt.insert(p.index, p.prompt_tokens);
                    }
                    generated.insert(p.index, p.generated);
                    yield Ok(Event::default().json_data(to_chunk(p)).unwrap_or_default());
                }
                Err(e) => yield Ok(Event::default().json_data(e.body().openai(e.status())).unwrap_or_default()),
            }
        }
        if let Some(make) = usage_chunk {
            let u = usage(prompt.values().sum(), generated.values().sum());
            yield Ok(Event::default().json_data(make(u)).unwrap_or_default());
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// The routes that answer errors in OpenAI's shape (`error::OpenAiErrorBody`).
pub fn is_route(path: &str) -> bool {
    matches!(path, "/v1/completions" | "/v1/chat/completions" | "/v1/models")
}

/// Names that mean the base model on the OpenAI routes: none, the model id (or its last path
/// part), and the conventional placeholders `tgi` and `tessera`.
fn is_base_model(s: &AppState, model: &str) -> bool {
    let id = s.info.model_id.as_str();
    let short = id.trim_end_matches('/').rsplit('/').next().unwrap_or(id);
    model.is_empty() || model == id || model == short || model == "tgi" || model == "tessera"
}

/// The adapter an OpenAI `model` names (None: the base model). A name that cannot be an adapter
/// is unknown (404) here rather than invalid: OpenAI answers an unknown model with 404.
fn adapter_for_model(s: &AppState, model: Option<&str>) -> Result<Option<String>, InferError> {
    match model {
        None => Ok(None),
        Some(m) if is_base_model(s, m) => Ok(None),
        Some(m) if crate::validation::valid_adapter_name(m) => Ok(Some(m.to_string())),
        Some(m) => Err(InferError::Shard { code: crate::pb::ErrorCode::AdapterNotFound, message: format!("unknown model {m:?}") }),
    }
}

/// OpenAI's answer to an unknown model: 404, naming it.
fn model_error(e: InferError, model: Option<&str>) -> Response {
    match e {
        InferError::Shard { code: crate::pb::ErrorCode::AdapterNotFound, .. } => {
            let model = model.unwrap_or_default();
            crate::error::RequestError::NotFound(format!(
                "the model `{model}` does not exist: it is neither the base model nor a known adapter (see /v1/models)"
            ))
            .into_response()
        }
        e => e.into_response(),
    }
}

/// `GET /v1/models`: the base model, then every adapter usable by name.
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI", responses((status = 200, body = ModelList),
    (status = 424, body = crate::error::OpenAiErrorBody)))]
pub async fn models(State(s): State<AppState>) -> Response {
    let adapters = match s.infer.adapters().list().await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let card = |id: String, parent: Option<String>| ModelCard { id, object: "model".into(), created: 0, owned_by: "tessera".into(), parent };
    let mut data = vec![card(s.info.model_id.clone(), None)];
    data.extend(adapters.into_iter().map(|a| card(a.name, Some(s.info.model_id.clone()))));
    Json(ModelList { object: "list".into(), data }).into_response()
}
