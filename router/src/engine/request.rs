//! A request as the engine takes it: validated, tokenized, its parameters checked
//! (`infer::validation` makes these; only these enter the queue).

use crate::engine::grammar::Constraint;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct ValidParameters {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub typical_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub watermark: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidStopping {
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos_token: bool,
}

#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    /// The prompt text (after truncation), for `return_full_text`.
    pub inputs: String,
    pub input_ids: Arc<Vec<u32>>,
    pub parameters: ValidParameters,
    pub stopping: ValidStopping,
    pub details: bool,
    pub return_full_text: bool,
    /// Prompt tokens with logprobs in the details.
    pub decoder_input_details: bool,
    /// Alternatives per generated token.
    pub top_n_tokens: u32,
    /// Sequences to generate; the best is returned (1 = plain).
    pub best_of: u32,
    /// LoRA adapter; None = the base model.
    pub adapter_id: Option<String>,
    /// Whether `details.seed` is reported (sampling is on).
    pub report_seed: bool,
    /// Structured output: the grammar's state before the first token (each sequence follows a
    /// copy of it); None: unconstrained.
    pub grammar: Option<Constraint>,
}

impl ValidGenerateRequest {
    pub fn input_length(&self) -> u32 {
        self.input_ids.len() as u32
    }
    /// Tokens the request can occupy in the KV cache at most.
    pub fn max_tokens(&self) -> u32 {
        self.input_length() + self.stopping.max_new_tokens
    }
}
