//! OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.
//! Requests become TGI `GenerateRequest`s and go through the same validation and queue.

mod checks;
mod stream;
mod tools;
mod types;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::select_all;

use self::checks::Route;
use self::stream::{openai_choice_stream, sse_response, ChoicePiece};
pub use self::types::*;
use crate::api::{FinishReason, GenerateParameters, GenerateRequest, Token};
use crate::error::{InferError, ValidationError};
use crate::infer::chat::TemplateMessage;
use crate::infer::InferResponse;
use crate::http::{AppState, JsonBody};

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
        return Err(ValidationError::OpenAiTemperature(temperature).into());
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

fn text_before_stop(r: &InferResponse) -> String {
    match r.details.stop_at {
        Some(at) => r.generated_text[..at].to_string(),
        None => r.generated_text.clone(),
    }
}

pub(crate) fn usage(prompt: u32, completion: u32, cached: u32) -> Usage {
    Usage { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: cached } }
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
pub async fn completions(State(s): State<AppState>, JsonBody(req): JsonBody<CompletionRequest>) -> Response {
    let model = req.model.clone();
    answer(completions_inner(s, req).await, Route::Completions, model.as_deref())
}

async fn completions_inner(s: AppState, mut req: CompletionRequest) -> Result<Response, InferError> {
    let grammar = checks::response_format(&mut req.unknown)?;
    checks::refuse_unsupported(&req.unknown)?;
    let limits = s.infer.validation().limits();
    let n = checks::choices(req.sampling.n, limits)?;
    let top_n = checks::top_n(req.logprobs, Route::Completions, limits)?;
    let mut params = to_parameters(&req.sampling, Some(req.max_tokens.unwrap_or(16)), top_n)?;
    params.adapter_id = adapter_for_model(&s, req.model.as_deref())?;
    params.grammar = grammar;
    let prompts = req.prompt.clone().into_vec();
    if prompts.is_empty() {
        return Err(ValidationError::EmptyInput.into());
    }
    let model = req.model.clone().unwrap_or_else(|| s.info.model_id.clone());
    let id = new_id("cmpl");
    let created = now();
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let mut streams = vec![];
        for (pi, prompt) in prompts.iter().enumerate() {
            let gen = GenerateRequest { inputs: prompt.clone(), parameters: params.clone(), stream: true, ..Default::default() };
            for (j, (valid, st)) in s.infer.generate_streams(gen, Some(n)).await.map_err(checks::as_response_format)?.into_iter().enumerate() {
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
            .ok()
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
        return Ok(sse_response(vec![], select_all(streams), to_chunk, include_usage.then_some(usage_chunk), n));
    }
    let mut choices = vec![];
    let (mut prompt_tokens, mut completion_tokens, mut cached_tokens) = (0, 0, 0);
    for (pi, prompt) in prompts.iter().enumerate() {
        let gen = GenerateRequest { inputs: prompt.clone(), parameters: params.clone(), ..Default::default() };
        let all = s.infer.generate_n(gen, Some(n)).await.map_err(checks::as_response_format)?;
        // Each prompt counts once, however many choices it has.
        prompt_tokens += all.first().map_or(0, |r| r.details.input_length);
        cached_tokens += all.first().map_or(0, |r| r.details.cached_tokens);
        for (j, r) in all.into_iter().enumerate() {
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
        usage: Some(usage(prompt_tokens, completion_tokens, cached_tokens)),
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
pub async fn chat_completions(State(s): State<AppState>, JsonBody(req): JsonBody<ChatCompletionRequest>) -> Response {
    let model = req.model.clone();
    answer(chat_inner(s, req).await, Route::Chat, model.as_deref())
}

/// The conversation's prompt. With tools, a template that renders them gets them; otherwise
/// they are described in the system message.
fn render_chat(s: &AppState, messages: &[ChatMessage], tools: Option<&tools::Tools>) -> Result<String, InferError> {
    let template = s
        .chat_template
        .as_ref()
        .ok_or_else(|| InferError::Validation(ValidationError::Template("this model has no chat template".into())))?;
    let mut msgs = checks::template_messages(messages)?;
    let listed = match tools {
        Some(t) if template.renders_tools => Some(&t.list),
        Some(t) => {
            match msgs.first_mut().filter(|m| m.role == "system") {
                Some(m) => m.content = format!("{}\n\n{}", m.content, t.prompt()),
                None => msgs.insert(0, TemplateMessage { role: "system".into(), content: t.prompt() }),
            }
            None
        }
        None => None,
    };
    template.apply_with_tools(&msgs, true, listed).map_err(|e| ValidationError::Template(e).into())
}

async fn chat_inner(s: AppState, mut req: ChatCompletionRequest) -> Result<Response, InferError> {
    let mut grammar = checks::response_format(&mut req.unknown)?;
    let tools = tools::take(&mut req.unknown)?;
    if let Some(t) = &tools {
        if grammar.is_some() {
            return Err(ValidationError::Param {
                message: "`tools` and `response_format` cannot be used together".into(),
                param: "response_format".into(),
            }
            .into());
        }
        grammar = Some(t.grammar());
    }
    checks::refuse_unsupported(&req.unknown)?;
    let limits = s.infer.validation().limits();
    let n = checks::choices(req.sampling.n, limits)?;
    let top_n = checks::top_n(req.top_logprobs, Route::Chat, limits)?;
    let top_n = if req.logprobs { top_n } else { 0 };
    let max = req.max_completion_tokens.or(req.max_tokens);
    let mut params = to_parameters(&req.sampling, max, top_n)?;
    params.adapter_id = adapter_for_model(&s, req.model.as_deref())?;
    params.grammar = grammar;
    let prompt = render_chat(&s, &req.messages, tools.as_ref())?;
    let model = req.model.clone().unwrap_or_else(|| s.info.model_id.clone());
    let id = new_id("chatcmpl");
    let created = now();
    let gen = GenerateRequest { inputs: prompt, parameters: params, stream: req.sampling.stream, ..Default::default() };
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let mut streams = vec![];
        for (j, (valid, st)) in s.infer.generate_streams(gen, Some(n)).await.map_err(checks::as_response_format)?.into_iter().enumerate() {
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
            .map(|i| chunk(vec![ChunkChoice { index: i, delta: Delta { role: Some("assistant".into()), content: Some(String::new()), tool_calls: None }, logprobs: None, finish_reason: None }], None))
            .collect();
        let logprobs = req.logprobs;
        let chunk2 = chunk.clone();
        // With tools the answer is read whole: its text is held back and sent as a tool call (or
        // as `no_tool`'s text) with the choice's last chunk.
        let mut held: std::collections::HashMap<u32, String> = Default::default();
        let to_chunk = move |p: ChoicePiece| {
            let lp = logprobs.then(|| chat_logprobs(&p.tokens, &p.tops));
            let delta = match &tools {
                None => Delta { content: (!p.text.is_empty() || p.finish.is_none()).then_some(p.text), ..Default::default() },
                Some(t) => {
                    let text = held.entry(p.index).or_default();
                    text.push_str(&p.text);
                    let Some(finish) = p.finish else {
                        return lp.map(|lp| chunk2(vec![ChunkChoice { index: p.index, delta: Delta::default(), logprobs: Some(lp), finish_reason: None }], None));
                    };
                    let text = held.remove(&p.index).unwrap_or_default();
                    let (message, reason) = tool_answer(t, text, finish);
                    let calls = message.tool_calls.map(|c| c.into_iter().map(|c| ToolCall { index: Some(0), ..c }).collect());
                    return Some(chunk2(vec![ChunkChoice { index: p.index, delta: Delta { content: message.content, tool_calls: calls, role: None },
                                                         logprobs: lp, finish_reason: Some(reason) }], None));
                }
            };
            Some(chunk2(
                vec![ChunkChoice { index: p.index, delta, logprobs: lp, finish_reason: p.finish.map(finish_reason) }],
                None,
            ))
        };
        let usage_chunk = move |u: Usage| chunk(vec![], Some(u));
        return Ok(sse_response(roles, select_all(streams), to_chunk, include_usage.then_some(usage_chunk), n));
    }
    let all = s.infer.generate_n(gen, Some(n)).await.map_err(checks::as_response_format)?;
    let prompt_tokens = all.first().map_or(0, |r| r.details.input_length);
    let cached_tokens = all.first().map_or(0, |r| r.details.cached_tokens);
    let completion_tokens = all.iter().map(|r| r.details.generated_tokens).sum();
    let choices = all
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (message, finish_reason) = match &tools {
                Some(t) => tool_answer(t, text_before_stop(r), r.details.finish_reason),
                None => (AssistantMessage { role: "assistant".into(), content: Some(text_before_stop(r)), tool_calls: None },
                         finish_reason(r.details.finish_reason)),
            };
            ChatChoice {
                index: i as u32,
                message,
                logprobs: req.logprobs.then(|| chat_logprobs(&r.details.tokens, &r.details.top_tokens)),
                finish_reason,
            }
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created,
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: usage(prompt_tokens, completion_tokens, cached_tokens),
    })
    .into_response())
}

/// A tools request's answer: a call (finish reason `tool_calls`), or text (`no_tool`'s, or what
/// was generated when `max_tokens` cut the call short).
fn tool_answer(t: &tools::Tools, text: String, finish: FinishReason) -> (AssistantMessage, String) {
    let answer = if finish == FinishReason::Length { tools::Answer::Text(text) } else { t.read(&text) };
    match answer {
        tools::Answer::Call { name, arguments } => {
            let call = ToolCall { index: None, id: tools::call_id(), kind: "function".into(), function: FunctionCall { name, arguments } };
            (AssistantMessage { role: "assistant".into(), content: None, tool_calls: Some(vec![call]) }, "tool_calls".into())
        }
        tools::Answer::Text(text) => {
            let reason = if finish == FinishReason::Length { "length".into() } else { "stop".into() };
            (AssistantMessage { role: "assistant".into(), content: Some(text), tool_calls: None }, reason)
        }
    }
}

/// The routes that answer errors in OpenAI's shape (`error::OpenAiErrorBody`).
pub fn is_route(path: &str) -> bool {
    matches!(path, "/v1/completions" | "/v1/chat/completions" | "/v1/models")
}

/// Placeholders clients send for "whatever this server serves": TGI's client sends `tgi`,
/// huggingface_hub's `InferenceClient(url)` sends `dummy`.
const BASE_MODEL_ALIASES: [&str; 3] = ["tgi", "tessera", "dummy"];

/// Names that mean the base model on the OpenAI routes: none, the model id (or its last path
/// part), and the placeholders above.
fn is_base_model(s: &AppState, model: &str) -> bool {
    let id = s.info.model_id.as_str();
    let short = id.trim_end_matches('/').rsplit('/').next().unwrap_or(id);
    model.is_empty() || model == id || model == short || BASE_MODEL_ALIASES.contains(&model)
}

/// The adapter an OpenAI `model` names (None: the base model). A name that cannot be an adapter
/// is unknown (404) here rather than invalid: OpenAI answers an unknown model with 404.
fn adapter_for_model(s: &AppState, model: Option<&str>) -> Result<Option<String>, InferError> {
    match model {
        None => Ok(None),
        Some(m) if is_base_model(s, m) => Ok(None),
        Some(m) if crate::infer::validation::valid_adapter_name(m) => Ok(Some(m.to_string())),
        Some(m) => Err(InferError::Shard { code: crate::shard::pb::ErrorCode::AdapterNotFound, message: format!("unknown model {m:?}") }),
    }
}

/// A route's response, or its error in OpenAI's terms: the route's parameter names, and 404 for an
/// unknown `model`.
fn answer(result: Result<Response, InferError>, route: Route, model: Option<&str>) -> Response {
    result.unwrap_or_else(|e| model_error(checks::rename(e, route), model))
}

/// OpenAI's answer to an unknown model: 404, naming it.
fn model_error(e: InferError, model: Option<&str>) -> Response {
    match e {
        InferError::Shard { code: crate::shard::pb::ErrorCode::AdapterNotFound, .. } => {
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

