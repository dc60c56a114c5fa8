//! The OpenAI wire types: request and response bodies of `/v1/completions`,
//! `/v1/chat/completions` and `/v1/models`, with their OpenAPI schemas.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{null_as_default, UnknownFields};

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default, deserialize_with = "null_as_default")]
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
    pub n: Option<i64>,
    #[serde(default, deserialize_with = "null_as_default")]
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
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the text.
    #[serde(default, deserialize_with = "null_as_default")]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: OpenAiSampling,
    /// Fields this server does not implement (`suffix`, `logit_bias`, `best_of` > 1, ...):
    /// refused with 422 unless they say nothing (`openai::refuse_unsupported`).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// One part of a message's content; only `text` parts are read (others are refused).
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
    /// `system` (or `developer`), `user` or `assistant`.
    pub role: String,
    pub content: Option<MessageContent>,
    /// Other fields: `tool_calls` (an assistant's earlier calls) and `tool_call_id` / `name` (a
    /// tool's answer) are read; anything else is refused unless null.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
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
    #[serde(default, deserialize_with = "null_as_default")]
    pub logprobs: bool,
    /// Alternatives per token (0-5), with `logprobs`.
    #[schema(minimum = 0, maximum = 5)]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: OpenAiSampling,
    /// Fields this server does not implement (`tools`, `response_format`, `logit_bias`, ...):
    /// refused with 422 unless they say nothing (`openai::refuse_unsupported`).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
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
    /// The answer's text; null when the answer is a tool call.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A function call the model made (`tools`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    /// Present in streamed deltas: the call's position in `tool_calls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments, as a JSON text.
    pub arguments: String,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
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

