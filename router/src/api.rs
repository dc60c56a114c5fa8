//! TGI-compatible HTTP bodies (field names as TGI's), with their OpenAPI schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// `null` reads as the field's default, as if it were absent: clients send `"field": null` for
/// every optional they leave unset (`text_generation`'s pydantic models, the OpenAI SDKs).
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Fields a body carries that this server does not know. Anything in it but `null` (or an empty
/// list or object, which say "none") is refused with 422, never silently ignored.
pub type UnknownFields = BTreeMap<String, serde_json::Value>;

/// The first unknown field that says something, if any.
pub fn first_meaningful(unknown: &UnknownFields) -> Option<&str> {
    unknown.iter().find(|(_, v)| !is_empty_value(v)).map(|(k, _)| k.as_str())
}

/// `null`, `[]` and `{}`: a field present but saying nothing.
pub fn is_empty_value(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `parameters` of a TGI generate request. Numbers are parsed wide so that out-of-range
/// values reach validation and get a precise message.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct GenerateParameters {
    /// Tokens to generate at most (default: up to --max-total-tokens).
    #[schema(minimum = 1, example = 20)]
    pub max_new_tokens: Option<i64>,
    /// Sample instead of greedy decoding.
    pub do_sample: Option<bool>,
    /// Softmax temperature (> 0).
    #[schema(exclusive_minimum = 0.0, example = 0.7)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens.
    #[schema(minimum = 0, example = 50)]
    pub top_k: Option<i64>,
    /// Nucleus sampling mass, in (0, 1].
    #[schema(exclusive_minimum = 0.0, maximum = 1.0, example = 0.95)]
    pub top_p: Option<f32>,
    /// Typical sampling mass, in (0, 1].
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub typical_p: Option<f32>,
    /// Penalty on tokens already present (> 0; 1 = none).
    #[schema(exclusive_minimum = 0.0, example = 1.1)]
    pub repetition_penalty: Option<f32>,
    /// Subtracted per earlier occurrence in the output, in [-2, 2].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    /// Subtracted once a token occurred in the output, in [-2, 2].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    /// Random seed of the sampler.
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    /// Stop generating when any of these appears.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stop: Vec<String>,
    /// Keep only the last `truncate` prompt tokens.
    #[schema(minimum = 1)]
    pub truncate: Option<i64>,
    /// Prepend the prompt to the generated text.
    #[serde(default)]
    pub return_full_text: Option<bool>,
    /// Return details (tokens, logprobs, finish reason).
    #[serde(default, deserialize_with = "null_as_default")]
    pub details: bool,
    /// Return the prompt tokens with their logprobs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub decoder_input_details: bool,
    /// Return the n most likely alternatives of each token.
    #[schema(minimum = 0, maximum = 5)]
    pub top_n_tokens: Option<u32>,
    /// Generate this many sequences and return the most likely.
    #[schema(minimum = 1, maximum = 2)]
    pub best_of: Option<u32>,
    /// Watermark the output (Kirchenbauer et al.).
    #[serde(default, deserialize_with = "null_as_default")]
    pub watermark: bool,
    /// LoRA adapter to use.
    pub adapter_id: Option<String>,
    /// TGI's guided generation: not supported yet, refused (422) unless null.
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Value>,
    /// Parameters this server does not know: refused (422) unless null.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

/// Body of `POST /generate`, `POST /generate_stream` and `POST /`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct GenerateRequest {
    /// The prompt.
    #[schema(example = "What is Deep Learning?")]
    pub inputs: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub parameters: GenerateParameters,
    /// `POST /` only: stream server-sent events.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// Fields this server does not know: refused (422) unless null.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: UnknownFields,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

/// A prompt token; the first has no logprob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    /// Prompt tokens whose keys/values came from the prefix cache (not computed).
    pub cached_tokens: u32,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    /// Prompt tokens whose keys/values came from the prefix cache (not computed).
    pub cached_tokens: u32,
}

/// One server-sent event of `/generate_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

/// One token of `POST /tokenize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

/// `GET /info`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Info {
    pub model_id: String,
    pub model_dtype: String,
    pub model_device_type: String,
    pub attention_backend: String,
    pub max_concurrent_requests: usize,
    pub max_best_of: u32,
    pub max_stop_sequences: usize,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_batch_prefill_tokens: u32,
    /// Tokens per step: a token for each running request, then prompt chunks.
    pub max_batch_tokens: u32,
    pub max_batch_total_tokens: u32,
    pub max_top_n_tokens: u32,
    pub block_size: u32,
    pub kv_blocks_total: u32,
    /// Blocks held by running requests (total - free).
    pub kv_blocks_used: u32,
    pub kv_blocks_free: u32,
    /// Of the free blocks, those holding a cached prefix (reused by a matching prompt, else
    /// taken when unused ones run out).
    pub kv_blocks_cached: u32,
    pub queue_size: usize,
    /// LoRA adapters resident at once on each shard.
    pub max_active_adapters: u32,
    /// LoRA adapters usable by name (registered, resident, or in the adapter source).
    pub adapters: Vec<String>,
    /// Shards the model is split over (tensor parallelism; 1: not split).
    pub world_size: u32,
    /// Parameters each shard holds, in rank order (about 1/world_size of the model each).
    pub shard_parameters: Vec<u64>,
    pub router: String,
    pub version: String,
}
