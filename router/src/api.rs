//! HTTP request and response bodies, in TGI's field names.

use serde::{Deserialize, Serialize};

/// `parameters` of a TGI generate request. Numbers are parsed wide so that out-of-range
/// values reach validation and get a precise message.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerateParameters {
    pub max_new_tokens: Option<i64>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    pub truncate: Option<i64>,
    #[serde(default)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    pub top_n_tokens: Option<u32>,
    pub best_of: Option<u32>,
    #[serde(default)]
    pub watermark: bool,
    pub adapter_id: Option<String>,
}

/// Body of `POST /generate` and `POST /generate_stream`.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<Token>,
    pub tokens: Vec<Token>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// One server-sent event of `/generate_stream`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

/// `GET /info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub max_batch_total_tokens: u32,
    pub block_size: u32,
    pub kv_blocks_total: u32,
    pub kv_blocks_free: u32,
    pub queue_size: usize,
    pub router: String,
    pub version: String,
}
