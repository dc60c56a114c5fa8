//! Incremental detokenization and stop-sequence matching, done per request off the batching loop.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Turns a growing list of token ids into text deltas. Text is only emitted once it decodes
/// to complete characters, and words are decoded with a little left context so spacing is right.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Context tokens from the prompt at the front of `ids`.
    context: usize,
}

/// Prompt tokens decoded with the first generated tokens, for spacing.
const CONTEXT: usize = 5;

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32]) -> Self {
        let context: Vec<u32> = prompt[prompt.len().saturating_sub(CONTEXT)..].to_vec();
        let n = context.len();
        Self { tokenizer, ids: context, prefix_offset: 0, read_offset: n, context: n }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// The generated text as a whole, special tokens left out.
    pub fn generated_text(&self) -> String {
        self.tokenizer.decode(&self.ids[self.context..], true).unwrap_or_default()
    }
}

/// Finds the first stop sequence in the text generated so far.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    longest: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Self { stops, text: String::new(), longest }
    }

    /// Appends text; Some(stop) once a stop sequence has appeared.
    pub fn push(&mut self, delta: &str) -> Option<&str> {
        if self.stops.is_empty() || delta.is_empty() {
            return None;
        }
        self.text.push_str(delta);
        // Only the tail can hold a new match: the delta plus a stop's length before it.
        let mut start = self.text.len().saturating_sub(delta.len() + self.longest);
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let tail = &self.text[start..];
        self.stops.iter().find(|s| tail.contains(s.as_str())).map(|s| s.as_str())
    }

    /// Byte offset of the earliest stop sequence in `text`.
    pub fn first_match(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter_map(|s| text.find(s.as_str())).min()
    }
}

/// Streams text while holding back any tail that could still become a stop sequence, and
/// cuts the text before the stop sequence (OpenAI semantics: the stop is not returned).
pub struct StopTrimmer {
    stops: Vec<String>,
    pending: String,
    done: bool,
}

impl StopTrimmer {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, pending: String::new(), done: false }
    }

    /// Text that can be sent now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.done {
            return String::new();
        }
        self.pending.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.done = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return out;
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// What is left at the end of the generation.
    pub fn finish(&mut self) -> String {
        self.done = true;
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::validation::tests::test_tokenizer;

    #[test]
    fn deltas_rebuild_the_text() {
        let mut d = Detokenizer::new(test_tokenizer(), &[2]);
        let text: String = [3, 4, 5].iter().map(|&t| d.push(t)).collect();
        assert_eq!(text, " world a b");
        assert_eq!(d.generated_text(), "world a b");
    }

    #[test]
    fn special_tokens_are_left_out_of_the_text() {
        let mut d = Detokenizer::new(test_tokenizer(), &[2]);
        d.push(3);
        d.push(0);
        assert_eq!(d.generated_text(), "world");
    }

    #[test]
    fn stop_sequence_across_deltas() {
        let mut m = StopMatcher::new(vec!["ab c".into()]);
        assert!(m.push("xx a").is_none());
        assert!(m.push("b").is_none());
        assert_eq!(m.push(" cd"), Some("ab c"));
        assert_eq!(m.first_match("xx ab cd"), Some(3));
    }

    #[test]
    fn no_stops_never_match() {
        let mut m = StopMatcher::new(vec![]);
        assert!(m.push("anything").is_none());
    }

    #[test]
    fn trimmer_holds_back_possible_stops_and_cuts_before_them() {
        let mut t = StopTrimmer::new(vec!["END".into()]);
        assert_eq!(t.push("hello E"), "hello ");
        assert_eq!(t.push("x"), "Ex");
        assert_eq!(t.push(" EN"), " ");
        assert_eq!(t.push("D more"), "");
        assert_eq!(t.push("ignored"), "");
        let mut t = StopTrimmer::new(vec!["END".into()]);
        assert_eq!(t.push("abc E"), "abc ");
        assert_eq!(t.finish(), "E");
    }
}
