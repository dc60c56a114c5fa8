//! Structured output: grammars (a JSON schema, any JSON object, a regex, or the calls a tool list
//! allows) compiled once by content with llguidance over the model's vocabulary, and a matcher
//! per constrained request. The batching loop advances each matcher with every token of its
//! request and sends the next token mask with the step that computes it; the shard applies it
//! to that row's logits before sampling.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// What a request asks its output to be.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// JSON matching this schema.
    JsonSchema(Value),
    /// Text matching this regular expression.
    Regex(String),
}

impl GrammarSpec {
    /// Any JSON object (OpenAI's `json_object`).
    pub fn json_object() -> Self {
        GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
    }

    fn key(&self) -> String {
        match self {
            GrammarSpec::JsonSchema(v) => format!("json:{v}"),
            GrammarSpec::Regex(r) => format!("regex:{r}"),
        }
    }

    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonSchema(v) => {
                let mut v = v.clone();
                if let Some(schema) = v.as_object_mut() {
                    // llguidance's own options ride in the schema; a schema that sets them keeps them.
                    schema.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
                }
                TopLevelGrammar::from_json_schema(v)
            }
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        }
    }
}

/// The whitespace a JSON answer may put between two tokens: spaces or tabs, or at most one line
/// break with indentation, up to 64 of each. Pretty-printed JSON fits; a model that would
/// otherwise go on emitting blank lines (llguidance's default allows any run, so a sampled
/// answer could linger in whitespace until max_new_tokens) has to write the next token instead.
const JSON_WHITESPACE: &str = r"[\x20\x09]{1,64}|[\x20\x09]{0,64}\x0D?\x0A[\x20\x09]{0,64}";

/// Compiled grammars of one model's vocabulary, cached by content.
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
    eos: Vec<u32>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    compiled: HashMap<String, Arc<Matcher>>,
    order: VecDeque<String>,
}

const CACHE_SIZE: usize = 256;

impl Grammars {
    /// From the model's tokenizer.json, the vocabulary size of its logits and its end-of-sequence
    /// tokens (what a finished grammar allows).
    pub fn new(tokenizer_json: &Path, vocab: usize, eos: &[u32]) -> Result<Self, String> {
        let text = std::fs::read_to_string(tokenizer_json).map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| format!("grammar vocabulary: {e}"))?;
        if words.len() > vocab {
            return Err(format!("the tokenizer has {} tokens, more than the model's {vocab} logits", words.len()));
        }
        while words.len() < vocab {
            // ids the tokenizer does not name: special, never produced by a grammar
            let mut w = format!(".<[{}]>", words.len()).into_bytes();
            w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(w);
        }
        let first_eos = *eos.first().ok_or("the model names no end-of-sequence token")?;
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, first_eos), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("grammar engine: {e}"))?;
        factory.quiet();
        // More room than the defaults for schemas with free-form parts (any JSON value), whose
        // masks otherwise run out of work budget mid-answer.
        let limits = factory.limits_mut();
        limits.step_lexer_fuel *= 5;
        limits.step_max_items *= 5;
        Ok(Self { factory, vocab, eos: eos.to_vec(), cache: Mutex::default() })
    }

    /// A fresh matcher for `spec`, compiled now or taken from the cache; an invalid grammar or one
    /// using a feature llguidance does not support is an error the client can act on.
    pub fn matcher(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let key = spec.key();
        if let Some(m) = self.cache.lock().expect("grammar cache").compiled.get(&key) {
            crate::metrics::grammar_lookup(true, None);
            return Ok(Constraint { matcher: m.deep_clone(), vocab: self.vocab });
        }
        let t0 = Instant::now();
        let parser = self.factory.create_parser(spec.to_llguidance()).map_err(|e| e.to_string())?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(e);
        }
        crate::metrics::grammar_lookup(false, Some(t0.elapsed()));
        let m = Arc::new(m);
        let mut cache = self.cache.lock().expect("grammar cache");
        if cache.compiled.insert(key.clone(), m.clone()).is_none() {
            cache.order.push_back(key);
            while cache.order.len() > CACHE_SIZE {
                let old = cache.order.pop_front().expect("non-empty");
                cache.compiled.remove(&old);
            }
        }
        Ok(Constraint { matcher: m.deep_clone(), vocab: self.vocab })
    }

    pub fn eos(&self) -> &[u32] {
        &self.eos
    }
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Clone for Constraint {
    /// An independent copy (best_of's sequences each follow the grammar on their own).
    fn clone(&self) -> Self {
        Self { matcher: self.matcher.deep_clone(), vocab: self.vocab }
    }
}

impl Constraint {
    /// Advances past a token the shard sampled (under this constraint's mask).
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more: the request ends here.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The allowed next tokens as the shard reads them: a bit per id, little-endian 32-bit words.
    pub fn mask(&mut self) -> Result<Vec<u8>, String> {
        let vob = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let words = vob.as_slice();
        let mut out = Vec::with_capacity(self.vocab.div_ceil(32) * 4);
        for w in words.iter().take(self.vocab.div_ceil(32)) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(self.vocab.div_ceil(32) * 4, 0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level tokenizer.json: ids 0..255 are the bytes (GPT-2's byte-to-char map), 256 is
    /// the end-of-sequence token.
    fn tokenizer(dir: &Path) -> std::path::PathBuf {
        let mut vocab = serde_json::Map::new();
        let mut n = 0u32;
        for (id, b) in (0..=255u32).enumerate() {
            let c = if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
            vocab.insert(c.to_string(), id.into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 256, "content": "</s>", "special": true, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
        });
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, json.to_string()).unwrap();
        p
    }

    fn allowed(mask: &[u8]) -> Vec<u32> {
        (0..mask.len() as u32 * 8).filter(|i| mask[(i / 8) as usize] >> (i % 8) & 1 == 1).collect()
    }

    fn grammars() -> Grammars {
        // A directory per call: tests run in parallel, and one must not read another's half-written file.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tessera-grammar-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Grammars::new(&tokenizer(&dir), 260, &[256]).unwrap()
    }

    #[test]
    fn a_regex_allows_its_bytes_then_only_the_end() {
        let g = grammars();
        let mut c = g.matcher(&GrammarSpec::Regex("a[bc]".into())).unwrap();
        assert_eq!(allowed(&c.mask().unwrap()), vec![b'a' as u32]);
        c.consume(b'a' as u32).unwrap();
        assert_eq!(allowed(&c.mask().unwrap()), vec![b'b' as u32, b'c' as u32]);
        assert!(!c.is_done());
        c.consume(b'c' as u32).unwrap();
        assert!(c.is_done(), "nothing can follow: the request ends here");
        // While more may follow, the end of sequence is allowed once the text matches.
        let mut c = g.matcher(&GrammarSpec::Regex("a+".into())).unwrap();
        c.consume(b'a' as u32).unwrap();
        assert_eq!(allowed(&c.mask().unwrap()), vec![b'a' as u32, 256]);
        c.consume(256).unwrap();
        assert!(c.is_done());
        assert!(c.consume(b'a' as u32).is_err());
    }

    #[test]
    fn a_schema_is_compiled_once_and_bad_ones_are_refused() {
        let g = grammars();
        let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
        let mut a = g.matcher(&GrammarSpec::JsonSchema(schema.clone())).unwrap();
        let b = g.matcher(&GrammarSpec::JsonSchema(schema)).unwrap();
        assert_eq!(g.cache.lock().unwrap().compiled.len(), 1);
        assert!(allowed(&a.mask().unwrap()).contains(&(b'{' as u32)));
        a.consume(b'{' as u32).unwrap();
        assert!(!b.is_done());
        assert!(g.matcher(&GrammarSpec::Regex("a(".into())).is_err());
        assert!(g.matcher(&GrammarSpec::JsonSchema(serde_json::json!({"type": "nonsense"}))).is_err());
    }

    fn feed(c: &mut Constraint, text: &str) -> Result<(), String> {
        text.bytes().try_for_each(|b| c.consume(b as u32))
    }

    #[test]
    fn json_whitespace_is_bounded_between_tokens() {
        let g = grammars();
        // Pretty-printed JSON is accepted, to the end.
        let mut c = g.matcher(&GrammarSpec::json_object()).unwrap();
        feed(&mut c, "{\n  \"a\": [1, 2],\r\n\t\"b\" : {}\n}").unwrap();
        assert!(c.is_done());
        // Runs of whitespace are not: 64 spaces, then a token; one line break, not two.
        let mut c = g.matcher(&GrammarSpec::json_object()).unwrap();
        feed(&mut c, &format!("{{{}", " ".repeat(64))).unwrap();
        assert!(c.consume(b' ' as u32).is_err());
        let mut c = g.matcher(&GrammarSpec::json_object()).unwrap();
        feed(&mut c, "{\"a\": 1,\n").unwrap();
        assert!(c.consume(b'\n' as u32).is_err(), "no blank lines");
        // A schema that sets llguidance's options keeps them.
        let own = serde_json::json!({"type": "object", "x-guidance": {"whitespace_flexible": false}});
        let mut c = g.matcher(&GrammarSpec::JsonSchema(own)).unwrap();
        c.consume(b'{' as u32).unwrap();
        assert!(c.consume(b' ' as u32).is_err());
    }
}
