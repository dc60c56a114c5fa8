//! Parse, don't validate: HTTP bodies become `ValidGenerateRequest`s here, and only those
//! can enter the queue. Tokenization runs on the blocking pool, off the async runtime.

use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::api::{first_meaningful, GenerateRequest};
use crate::args::LimitArgs;
use crate::engine::grammar::{Constraint, GrammarSpec, Grammars};
use crate::error::ValidationError;

pub use crate::engine::request::{ValidGenerateRequest, ValidParameters, ValidStopping};

#[derive(Clone)]
pub struct Validation {
    tokenizer: Arc<Tokenizer>,
    limits: Arc<LimitArgs>,
    /// The most bytes of text one token can stand for, where the tokenizer bounds it (see
    /// `max_token_bytes`): prompts longer than `max_input_tokens` times this are refused
    /// without tokenizing them.
    max_token_bytes: Option<usize>,
    /// Structured output's grammar compiler over the model's vocabulary; None: refused.
    grammars: Option<Arc<Grammars>>,
}

impl Validation {
    pub fn new(tokenizer: Arc<Tokenizer>, limits: LimitArgs) -> Self {
        let max_token_bytes = max_token_bytes(&tokenizer);
        Self { tokenizer, limits: Arc::new(limits), max_token_bytes, grammars: None }
    }

    pub fn with_grammars(mut self, grammars: Arc<Grammars>) -> Self {
        self.grammars = Some(grammars);
        self
    }

    pub fn limits(&self) -> &LimitArgs {
        &self.limits
    }

    pub async fn validate(&self, req: GenerateRequest) -> Result<ValidGenerateRequest, ValidationError> {
        let checked = check_parameters(&req, &self.limits)?;
        // Cheap before costly: a prompt too long for any tokenization is refused untokenized.
        // (With `truncate` the whole prompt must be tokenized to find its last tokens.)
        if let (None, Some(per_token)) = (checked.truncate, self.max_token_bytes) {
            if req.inputs.len() > per_token.saturating_mul(self.limits.max_input_tokens as usize) {
                return Err(ValidationError::InputBytes(req.inputs.len(), self.limits.max_input_tokens));
            }
        }
        let grammar = self.grammar(req.parameters.grammar.as_ref()).await?;
        let (inputs, ids) = self.tokenize(req.inputs.clone(), checked.truncate).await?;
        let mut valid = finish(req, checked, inputs, ids, &self.limits)?;
        valid.grammar = grammar;
        Ok(valid)
    }

    /// TGI's `grammar` parameter, compiled (once per content; on the blocking pool).
    async fn grammar(&self, g: Option<&serde_json::Value>) -> Result<Option<Constraint>, ValidationError> {
        let Some(spec) = parse_grammar(g)? else { return Ok(None) };
        let Some(grammars) = self.grammars.clone() else { return Err(ValidationError::Unsupported("grammar".into())) };
        tokio::task::spawn_blocking(move || grammars.matcher(&spec))
            .await
            .map_err(|e| ValidationError::Grammar("grammar", e.to_string()))?
            .map(Some)
            .map_err(|e| ValidationError::Grammar("grammar", e))
    }

    /// Tokenizes on the blocking pool; with `truncate`, keeps the last tokens (and their text).
    pub async fn tokenize(&self, inputs: String, truncate: Option<usize>) -> Result<(String, Vec<u32>), ValidationError> {
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || tokenize(&tokenizer, inputs, truncate))
            .await
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))?
    }

    /// Token ids with their text spans, for `/tokenize`.
    pub async fn encode(&self, inputs: String) -> Result<tokenizers::Encoding, ValidationError> {
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || tokenizer.encode(inputs.as_str(), true))
            .await
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))?
            .map_err(|e| ValidationError::Tokenizer(e.to_string()))
    }
}

/// The most bytes of input one token can cover, when the tokenizer guarantees a bound: a BPE
/// model (every token is a merge of symbols spelled out in its vocabulary entry, so a token's
/// text is at most its entry's UTF-8 length; an unknown character becomes one `unk` token unless
/// `fuse_unk`) with no normalizer (which could delete characters). None: no bound, always tokenize.
fn max_token_bytes(tokenizer: &Tokenizer) -> Option<usize> {
    if tokenizer.get_normalizer().is_some() {
        return None;
    }
    match tokenizer.get_model() {
        tokenizers::ModelWrapper::BPE(bpe) if bpe.unk_token.is_none() || !bpe.fuse_unk => {}
        _ => return None,
    }
    tokenizer.get_vocab(true).keys().map(|k| k.len().max(4)).max()
}

/// Parameter checks that need no tokens.
struct Checked {
    parameters: ValidParameters,
    max_new_tokens: Option<u32>,
    truncate: Option<usize>,
    best_of: u32,
    top_n_tokens: u32,
    adapter_id: Option<String>,
}

/// Adapter ids are plain names resolved by the shard inside its adapter source: no paths.
pub fn valid_adapter_name(a: &str) -> bool {
    a.len() <= 128
        && !a.contains("..")
        && a.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && a.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn in_range(v: Option<f32>, neutral: f32, ok: impl Fn(f32) -> bool, err: impl Fn(f32) -> ValidationError) -> Result<f32, ValidationError> {
    let v = v.unwrap_or(neutral);
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(err(v))
    }
}

fn check_parameters(req: &GenerateRequest, limits: &LimitArgs) -> Result<Checked, ValidationError> {
    let p = &req.parameters;
    if let Some(field) = first_meaningful(&req.unknown).or_else(|| first_meaningful(&p.unknown)) {
        return Err(ValidationError::UnknownField(field.to_string()));
    }
    if req.inputs.is_empty() {
        return Err(ValidationError::EmptyInput);
    }
    let max_new_tokens = match p.max_new_tokens {
        Some(n) if n <= 0 => return Err(ValidationError::MaxNewTokens(n)),
        Some(n) => Some(n.min(u32::MAX as i64) as u32),
        None => None,
    };
    let temperature = in_range(p.temperature, 1.0, |v| v > 0.0, ValidationError::Temperature)?;
    let top_p = in_range(p.top_p, 1.0, |v| v > 0.0 && v <= 1.0, ValidationError::TopP)?;
    let typical_p = in_range(p.typical_p, 1.0, |v| v > 0.0 && v <= 1.0, ValidationError::TypicalP)?;
    let repetition_penalty = in_range(p.repetition_penalty, 1.0, |v| v > 0.0, ValidationError::RepetitionPenalty)?;
    let frequency_penalty = in_range(p.frequency_penalty, 0.0, |v| (-2.0..=2.0).contains(&v), ValidationError::FrequencyPenalty)?;
    let presence_penalty = in_range(p.presence_penalty, 0.0, |v| (-2.0..=2.0).contains(&v), ValidationError::PresencePenalty)?;
    let top_k = p.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(ValidationError::TopK(top_k));
    }
    if p.stop.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequences(limits.max_stop_sequences, p.stop.len()));
    }
    if p.stop.iter().any(|s| s.is_empty()) {
        return Err(ValidationError::EmptyStop);
    }
    let truncate = match p.truncate {
        Some(t) if t <= 0 || t > limits.max_input_tokens as i64 => {
            return Err(ValidationError::Truncate(t, limits.max_input_tokens))
        }
        Some(t) => Some(t as usize),
        None => None,
    };
    let top_n_tokens = p.top_n_tokens.unwrap_or(0);
    if top_n_tokens > limits.max_top_n_tokens {
        return Err(ValidationError::TopNTokens(limits.max_top_n_tokens, top_n_tokens));
    }
    let adapter_id = match p.adapter_id.as_deref() {
        None | Some("") => None,
        Some(a) if valid_adapter_name(a) => Some(a.to_string()),
        Some(a) => return Err(ValidationError::AdapterName(a.to_string())),
    };
    // As in TGI: any warper turns sampling on.
    let do_sample = p.do_sample.unwrap_or(false) || temperature != 1.0 || top_k > 0 || top_p < 1.0 || typical_p < 1.0;
    let best_of = p.best_of.unwrap_or(1);
    if best_of == 0 || best_of > limits.max_best_of {
        return Err(ValidationError::BestOf(limits.max_best_of, best_of));
    }
    if best_of > 1 && !do_sample {
        return Err(ValidationError::BestOfSampling);
    }
    if best_of > 1 && p.seed.is_some() {
        return Err(ValidationError::BestOfSeed);
    }
    let seed = p.seed.unwrap_or_else(rand::random);
    Ok(Checked {
        parameters: ValidParameters {
            temperature,
            top_k: top_k.min(u32::MAX as i64) as u32,
            top_p,
            typical_p,
            do_sample,
            seed,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            watermark: p.watermark,
        },
        max_new_tokens,
        truncate,
        best_of,
        top_n_tokens,
        adapter_id,
    })
}

fn tokenize(tokenizer: &Tokenizer, inputs: String, truncate: Option<usize>) -> Result<(String, Vec<u32>), ValidationError> {
    let enc = tokenizer.encode(inputs.as_str(), true).map_err(|e| ValidationError::Tokenizer(e.to_string()))?;
    let ids = enc.get_ids();
    match truncate {
        Some(t) if ids.len() > t => {
            let start = ids.len() - t;
            let offset = enc.get_offsets()[start].0;
            Ok((inputs[offset..].to_string(), ids[start..].to_vec()))
        }
        _ => Ok((inputs, ids.to_vec())),
    }
}

/// TGI's grammar shapes: `{"type": "json" | "json_object", "value": schema}` (no value: any JSON
/// object), `{"type": "json_schema", "value": {"name", "schema"} | schema}`, `{"type": "regex",
/// "value": "..."}`; null or absent: none.
pub fn parse_grammar(g: Option<&serde_json::Value>) -> Result<Option<GrammarSpec>, ValidationError> {
    let Some(g) = g.filter(|g| !g.is_null()) else { return Ok(None) };
    let bad = |why: &str| ValidationError::Grammar("grammar", why.to_string());
    let kind = g.get("type").and_then(|t| t.as_str()).ok_or_else(|| bad("`type` must be json, json_object, json_schema or regex"))?;
    let value = g.get("value").filter(|v| !v.is_null());
    match kind {
        "json" | "json_object" | "json_schema" => {
            let schema = match value {
                None => return Ok(Some(GrammarSpec::json_object())),
                // {"name": ..., "schema": {...}} (OpenAI's json_schema object), or the schema itself
                Some(v) if v.get("schema").is_some_and(|s| s.is_object()) && !v.get("type").is_some_and(|t| t.is_string()) => {
                    v["schema"].clone()
                }
                Some(v) => v.clone(),
            };
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("`value` must be a JSON schema (an object)"));
            }
            Ok(Some(GrammarSpec::JsonSchema(schema)))
        }
        "regex" => match value.and_then(|v| v.as_str()) {
            Some(r) if !r.is_empty() => Ok(Some(GrammarSpec::Regex(r.to_string()))),
            _ => Err(bad("`value` must be a non-empty regular expression string")),
        },
        other => Err(bad(&format!("unknown type {other:?}: json, json_object, json_schema or regex"))),
    }
}

fn finish(
    req: GenerateRequest,
    checked: Checked,
    inputs: String,
    ids: Vec<u32>,
    limits: &LimitArgs,
) -> Result<ValidGenerateRequest, ValidationError> {
    let n = ids.len() as u32;
    if n == 0 {
        return Err(ValidationError::EmptyInput);
    }
    if n > limits.max_input_tokens {
        return Err(ValidationError::InputLength(limits.max_input_tokens, n));
    }
    let max_new_tokens = checked.max_new_tokens.unwrap_or(limits.max_total_tokens - n);
    if n as u64 + max_new_tokens as u64 > limits.max_total_tokens as u64 {
        return Err(ValidationError::TotalTokens(limits.max_total_tokens, n, max_new_tokens));
    }
    let p = req.parameters;
    let report_seed = checked.parameters.do_sample;
    Ok(ValidGenerateRequest {
        inputs,
        input_ids: Arc::new(ids),
        parameters: checked.parameters,
        stopping: ValidStopping { max_new_tokens, stop_sequences: p.stop, ignore_eos_token: false },
        details: p.details,
        return_full_text: p.return_full_text.unwrap_or(false),
        decoder_input_details: p.decoder_input_details,
        top_n_tokens: checked.top_n_tokens,
        best_of: checked.best_of,
        adapter_id: checked.adapter_id,
        report_seed,
        grammar: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::GenerateParameters;

    /// A word-level tokenizer over a tiny vocabulary, built in memory (no files, no network).
    pub fn test_tokenizer() -> Arc<Tokenizer> {
        let json = r###"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
            {"id": 0, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null,
          "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
          "model": {"type": "WordLevel", "vocab": {"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3, "a": 4, "b": 5, "stop": 6}, "unk_token": "<unk>"}
        }"###;
        Arc::new(Tokenizer::from_bytes(json.as_bytes()).unwrap())
    }

    fn validation(limits: LimitArgs) -> Validation {
        Validation::new(test_tokenizer(), limits)
    }

    fn req(inputs: &str, parameters: GenerateParameters) -> GenerateRequest {
        GenerateRequest { inputs: inputs.into(), parameters, ..Default::default() }
    }

    #[tokio::test]
    async fn valid_request_is_tokenized() {
        let v = validation(LimitArgs::default());
        let r = v.validate(req("hello world", GenerateParameters { max_new_tokens: Some(5), ..Default::default() })).await.unwrap();
        assert_eq!(*r.input_ids, vec![2, 3]);
        assert_eq!(r.stopping.max_new_tokens, 5);
        assert!(!r.parameters.do_sample);
    }

    #[tokio::test]
    async fn default_max_new_tokens_fills_total() {
        let v = validation(LimitArgs { max_input_tokens: 10, max_total_tokens: 20, ..Default::default() });
        let r = v.validate(req("hello world", GenerateParameters::default())).await.unwrap();
        assert_eq!(r.stopping.max_new_tokens, 18);
    }

    #[tokio::test]
    async fn rejects_bad_ranges() {
        let v = validation(LimitArgs::default());
        let cases: Vec<(GenerateParameters, ValidationError)> = vec![
            (GenerateParameters { max_new_tokens: Some(0), ..Default::default() }, ValidationError::MaxNewTokens(0)),
            (GenerateParameters { max_new_tokens: Some(-3), ..Default::default() }, ValidationError::MaxNewTokens(-3)),
            (GenerateParameters { temperature: Some(0.0), ..Default::default() }, ValidationError::Temperature(0.0)),
            (GenerateParameters { top_p: Some(1.5), ..Default::default() }, ValidationError::TopP(1.5)),
            (GenerateParameters { top_p: Some(0.0), ..Default::default() }, ValidationError::TopP(0.0)),
            (GenerateParameters { top_k: Some(-1), ..Default::default() }, ValidationError::TopK(-1)),
            (GenerateParameters { repetition_penalty: Some(0.0), ..Default::default() }, ValidationError::RepetitionPenalty(0.0)),
            (GenerateParameters { stop: vec!["".into()], ..Default::default() }, ValidationError::EmptyStop),
            (GenerateParameters { stop: vec!["a".into(); 5], ..Default::default() }, ValidationError::StopSequences(4, 5)),
            (GenerateParameters { best_of: Some(2), ..Default::default() }, ValidationError::BestOfSampling),
            (GenerateParameters { best_of: Some(3), do_sample: Some(true), ..Default::default() }, ValidationError::BestOf(2, 3)),
            (GenerateParameters { best_of: Some(2), do_sample: Some(true), seed: Some(1), ..Default::default() }, ValidationError::BestOfSeed),
            (GenerateParameters { typical_p: Some(0.0), ..Default::default() }, ValidationError::TypicalP(0.0)),
            (GenerateParameters { frequency_penalty: Some(2.5), ..Default::default() }, ValidationError::FrequencyPenalty(2.5)),
            (GenerateParameters { presence_penalty: Some(-3.0), ..Default::default() }, ValidationError::PresencePenalty(-3.0)),
            (GenerateParameters { top_n_tokens: Some(6), ..Default::default() }, ValidationError::TopNTokens(5, 6)),
            (GenerateParameters { adapter_id: Some("../etc".into()), ..Default::default() }, ValidationError::AdapterName("../etc".into())),
            (GenerateParameters { adapter_id: Some("/abs/path".into()), ..Default::default() }, ValidationError::AdapterName("/abs/path".into())),
        ];
        for (p, want) in cases {
            assert_eq!(v.validate(req("hello", p)).await.unwrap_err(), want);
        }
    }

    #[tokio::test]
    async fn rejects_non_finite_numbers() {
        let v = validation(LimitArgs::default());
        let p = GenerateParameters { temperature: Some(f32::NAN), ..Default::default() };
        assert!(matches!(v.validate(req("hello", p)).await, Err(ValidationError::Temperature(_))));
        let p = GenerateParameters { top_p: Some(f32::INFINITY), ..Default::default() };
        assert!(matches!(v.validate(req("hello", p)).await, Err(ValidationError::TopP(_))));
    }

    #[tokio::test]
    async fn rejects_empty_and_too_long() {
        let v = validation(LimitArgs { max_input_tokens: 2, max_total_tokens: 4, ..Default::default() });
        assert_eq!(v.validate(req("", Default::default())).await.unwrap_err(), ValidationError::EmptyInput);
        assert_eq!(v.validate(req("a b a", Default::default())).await.unwrap_err(), ValidationError::InputLength(2, 3));
        let p = GenerateParameters { max_new_tokens: Some(3), ..Default::default() };
        assert_eq!(v.validate(req("a b", p)).await.unwrap_err(), ValidationError::TotalTokens(4, 2, 3));
    }

    /// A byte-level-free BPE over {a, b, ab}: no normalizer, so token lengths bound prompt bytes.
    fn bpe_tokenizer() -> Arc<Tokenizer> {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}"#;
        Arc::new(Tokenizer::from_bytes(json.as_bytes()).unwrap())
    }

    #[tokio::test]
    async fn prompts_too_long_for_any_tokenization_are_refused_untokenized() {
        assert_eq!(max_token_bytes(&bpe_tokenizer()), Some(4)); // a whole character at least
        assert_eq!(max_token_bytes(&test_tokenizer()), None); // WordLevel: one <unk> may cover anything
        let v = Validation::new(bpe_tokenizer(), LimitArgs { max_input_tokens: 2, max_total_tokens: 8, ..Default::default() });
        let p = || GenerateParameters { max_new_tokens: Some(1), ..Default::default() };
        // 8 bytes could be 2 tokens: tokenized (4 tokens, too many); 9 bytes cannot: refused before.
        assert_eq!(v.validate(req("abababab", p())).await.unwrap_err(), ValidationError::InputLength(2, 4));
        assert_eq!(v.validate(req("ababababa", p())).await.unwrap_err(), ValidationError::InputBytes(9, 2));
        // With `truncate` the whole prompt is tokenized to keep its tail.
        let t = GenerateParameters { truncate: Some(2), ..p() };
        assert_eq!(*v.validate(req("ababababab", t)).await.unwrap().input_ids, vec![2, 2]);
    }

    #[tokio::test]
    async fn unknown_fields_are_refused_and_grammars_without_a_grammar_engine() {
        let v = validation(LimitArgs::default());
        let body: GenerateRequest = serde_json::from_str(r#"{"inputs": "hello", "parameters": {"foo": 1, "bar": null}}"#).unwrap();
        assert_eq!(v.validate(body).await.unwrap_err(), ValidationError::UnknownField("foo".into()));
        // No grammar engine (the model names no end-of-sequence token, say): refused, not ignored.
        let body: GenerateRequest = serde_json::from_str(r#"{"inputs": "hello", "parameters": {"grammar": {"type": "json"}}}"#).unwrap();
        assert_eq!(v.validate(body).await.unwrap_err(), ValidationError::Unsupported("grammar".into()));
        let body: GenerateRequest = serde_json::from_str(
            r#"{"inputs": "hello", "stream": null, "parameters": {"max_new_tokens": 1, "details": null, "stop": null, "grammar": null, "x": []}}"#,
        )
        .unwrap();
        assert!(v.validate(body).await.is_ok());
    }

    #[tokio::test]
    async fn truncate_keeps_the_tail() {
        let v = validation(LimitArgs::default());
        let p = GenerateParameters { truncate: Some(1), max_new_tokens: Some(1), ..Default::default() };
        let r = v.validate(req("hello world", p)).await.unwrap();
        assert_eq!(*r.input_ids, vec![3]);
        assert_eq!(r.inputs, "world");
    }

    #[tokio::test]
    async fn warpers_turn_sampling_on() {
        let v = validation(LimitArgs::default());
        let p = GenerateParameters { temperature: Some(0.7), max_new_tokens: Some(1), ..Default::default() };
        assert!(v.validate(req("hello", p)).await.unwrap().parameters.do_sample);
        let p = GenerateParameters { seed: Some(7), max_new_tokens: Some(1), do_sample: Some(true), ..Default::default() };
        assert_eq!(v.validate(req("hello", p)).await.unwrap().parameters.seed, 7);
    }

    #[test]
    fn tgi_grammar_shapes() {
        use serde_json::json;
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let parse = |v: serde_json::Value| parse_grammar(Some(&v));
        assert_eq!(parse(json!({"type": "json", "value": schema})).unwrap(), Some(GrammarSpec::JsonSchema(schema.clone())));
        assert_eq!(parse(json!({"type": "json_object"})).unwrap(), Some(GrammarSpec::json_object()));
        assert_eq!(parse(json!({"type": "json_schema", "value": {"name": "x", "schema": schema}})).unwrap(),
                   Some(GrammarSpec::JsonSchema(schema.clone())));
        assert_eq!(parse(json!({"type": "regex", "value": "a+"})).unwrap(), Some(GrammarSpec::Regex("a+".into())));
        assert_eq!(parse_grammar(Some(&serde_json::Value::Null)).unwrap(), None);
        for bad in [json!({"value": "a"}), json!({"type": "regex"}), json!({"type": "regex", "value": ""}),
                    json!({"type": "json", "value": "x"}), json!({"type": "yaml", "value": "a"})] {
            assert!(matches!(parse(bad.clone()), Err(ValidationError::Grammar("grammar", _))), "{bad}");
        }
    }
}
