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

/// A request's stop sequences, and the two questions every caller asks of them: where the
/// earliest one starts in a text, and how much of a text's end could still become one. The
/// batching-side matcher and the OpenAI stream trimmer both answer through this, so they cut
/// at the same place.
#[derive(Clone, Debug, Default)]
pub struct StopSequences {
    stops: Vec<String>,
    longest: usize,
}

impl StopSequences {
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Self { stops, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Byte offset of the earliest stop sequence in `text`.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// Length in bytes of the longest tail of `text` that is a proper start of some stop
    /// sequence: text that must be held back until the next delta says whether it stops.
    pub fn open_tail(&self, text: &str) -> usize {
        let from = floor_char_boundary(text, text.len().saturating_sub(self.longest));
        text[from..]
            .char_indices()
            .map(|(i, _)| &text[from + i..])
            .find(|tail| self.stops.iter().any(|s| s.starts_with(tail)))
            .map_or(0, str::len)
    }
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Watches the text generated so far for a stop sequence. It keeps only the tail a new delta
/// can complete a stop with (the longest stop's length), not the whole text.
pub struct StopMatcher {
    stops: StopSequences,
    tail: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: StopSequences::new(stops), tail: String::new() }
    }

    /// The stop sequences it watches for.
    pub fn sequences(&self) -> &StopSequences {
        &self.stops
    }

    /// Appends text; true once a stop sequence has appeared.
    pub fn push(&mut self, delta: &str) -> bool {
        if self.stops.is_empty() || delta.is_empty() {
            return false;
        }
        self.tail.push_str(delta);
        if self.stops.find(&self.tail).is_some() {
            return true;
        }
        let keep_from = floor_char_boundary(&self.tail, self.tail.len().saturating_sub(self.stops.longest));
        self.tail.drain(..keep_from);
        false
    }
}

/// Streams text while holding back any tail that could still become a stop sequence, and
/// cuts the text before the stop sequence (OpenAI semantics: the stop is not returned).
pub struct StopTrimmer {
    stops: StopSequences,
    pending: String,
    done: bool,
}

impl StopTrimmer {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: StopSequences::new(stops), pending: String::new(), done: false }
    }

    /// Text that can be sent now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.done {
            return String::new();
        }
        self.pending.push_str(delta);
        if let Some(at) = self.stops.find(&self.pending) {
            self.done = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return out;
        }
        let cut = self.pending.len() - self.stops.open_tail(&self.pending);
        self.pending.drain(..cut).collect()
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
        assert!(!m.push("xx a"));
        assert!(!m.push("b"));
        assert!(m.push(" cd"));
        assert_eq!(m.sequences().find("xx ab cd"), Some(3));
        // Across many deltas and multi-byte characters, with only the tail kept.
        let mut m = StopMatcher::new(vec!["été!".into()]);
        assert!("un long été".chars().all(|c| !m.push(&c.to_string())));
        assert!(m.tail.len() <= "été!".len());
        assert!(m.push("!"));
    }

    #[test]
    fn no_stops_never_match() {
        let mut m = StopMatcher::new(vec![]);
        assert!(!m.push("anything"));
    }

    #[test]
    fn open_tail_is_the_longest_start_of_any_stop_on_char_boundaries() {
        let stops = StopSequences::new(vec!["été fini".into(), "xy".into()]);
        assert_eq!(stops.open_tail("c'est l'ét"), "ét".len());
        assert_eq!(stops.open_tail("abc x"), 1);
        assert_eq!(stops.open_tail("abc"), 0);
        assert_eq!(stops.open_tail("été fin"), "été fin".len());
        assert_eq!(stops.find("un été fini"), Some(3));
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
