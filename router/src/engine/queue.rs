//! The waiting queue: a plain struct the batching loop owns (admission happens in the loop's
//! step). The HTTP side appends through a `QueueHandle` (a channel the loop drains). Admission
//! is FIFO within a prefill token budget and the free KV blocks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::grammar::Constraint;
use crate::engine::kv::{BlockAllocation, BlockAllocator, Prefix};
use crate::error::InferError;
use crate::shard::pb;
use crate::engine::request::ValidGenerateRequest;

/// What the batching loop sends back to a request's response stream.
#[derive(Debug, Clone)]
pub enum ShardEvent {
    /// One generated token; `finish` is set on the last one.
    Token {
        id: u32,
        logprob: f32,
        finish: Option<pb::FinishReason>,
        seed: u64,
        /// Best alternatives of this token (when asked for).
        top: Option<pb::Tokens>,
        /// Prompt tokens with logprobs (first token only, when asked for).
        prefill: Option<pb::Tokens>,
        /// Prompt tokens whose keys/values came from the prefix cache.
        cached: u32,
        queued: Instant,
        started: Instant,
    },
}

pub type EventSender = mpsc::UnboundedSender<Result<ShardEvent, InferError>>;

/// A request from the moment it is accepted until it finishes.
#[derive(Debug)]
pub struct Entry {
    pub request: Arc<ValidGenerateRequest>,
    pub events: EventSender,
    pub queued: Instant,
    pub started: Option<Instant>,
    /// Set once admitted; dropping the entry frees the blocks.
    pub allocation: Option<BlockAllocation>,
    /// The request's trace span, when tracing is on.
    pub span: Option<opentelemetry::trace::SpanContext>,
    /// Prefix-cache key ("" for the base model, else the adapter's load); None: no caching.
    pub prefix: Option<Arc<str>>,
    /// Tokens generated so far.
    pub generated: Vec<u32>,
    /// Positions whose keys/values the shard has computed (prompt, then all but the last token).
    pub kv_valid: u32,
    /// Admitted, its prefill's first token not yet here.
    pub fresh: bool,
    /// Prompt tokens the first admission found in the prefix cache (what the response reports).
    pub first_cached: Option<u32>,
    /// Structured output: the grammar after the tokens generated so far.
    pub grammar: Option<Constraint>,
}

impl Entry {
    pub fn new(request: ValidGenerateRequest, events: EventSender) -> Self {
        let grammar = request.grammar.clone();
        Self { request: Arc::new(request), events, queued: Instant::now(), started: None, allocation: None, span: None,
               prefix: None, generated: Vec::new(), kv_valid: 0, fresh: false, first_cached: None, grammar }
    }

    /// Leading prompt tokens served from the prefix cache (at its first admission).
    pub fn cached_tokens(&self) -> u32 {
        self.first_cached.or_else(|| self.allocation.as_ref().map(|a| a.cached_tokens)).unwrap_or(0)
    }

    /// Tokens a prefill feeds: the prompt, then what it generated before it was preempted.
    pub fn fed(&self) -> u32 {
        self.request.input_length() + self.generated.len() as u32
    }

    /// The prompt and the generated tokens.
    pub fn tokens(&self) -> Vec<u32> {
        self.request.input_ids.iter().chain(&self.generated).copied().collect()
    }

    /// KV positions the next shard call may write: what is fed so far, and the position of the
    /// step a shard with overlapped steps launches ahead (never past the last fed position,
    /// input + max_new_tokens - 2).
    pub fn needed_positions(&self) -> u32 {
        let last = self.request.input_length() + self.request.stopping.max_new_tokens.max(1) - 1;
        self.fed().max((self.fed() + 1).min(last))
    }

    /// The client is gone (disconnected, or its stream ended on a stop sequence).
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// A token arrived. The first of an admission means its prefill is computed: its full blocks
    /// go to the prefix cache. Then the token before this one has keys/values.
    pub fn record_token(&mut self, id: u32) {
        if self.fresh {
            self.fresh = false;
            self.kv_valid = self.fed();
            self.first_cached.get_or_insert(self.allocation.as_ref().map_or(0, |a| a.cached_tokens));
            self.publish();
        }
        self.generated.push(id);
        self.kv_valid = self.fed() - 1;
    }

    /// Offers the computed full blocks (prompt and generated tokens) to the prefix cache.
    fn publish(&self) {
        if let (Some(key), Some(a)) = (&self.prefix, &self.allocation) {
            if self.kv_valid > 0 {
                a.publish(key, &self.tokens(), self.kv_valid);
            }
        }
    }

    /// Gives its blocks back to make room for older requests; what it computed stays cached, so
    /// its recompute (prompt + generated tokens) is cheap when it is admitted again.
    pub fn preempt(&mut self) {
        self.publish();
        self.allocation = None;
        self.kv_valid = 0;
        crate::metrics::preemption();
    }
}

impl Drop for Entry {
    /// What the request computed (prompt and generated tokens, full blocks only) goes to the
    /// prefix cache before its blocks are released: a conversation's next turn starts with it.
    fn drop(&mut self) {
        self.publish();
    }
}

/// Budget for one admission.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most new requests to admit.
    pub max_size: Option<usize>,
    /// Prompt tokens the step has room for: requests are admitted while some is left (the last
    /// one's prompt may run past it: it is computed in chunks over the next steps).
    pub prefill_tokens: u32,
    /// KV blocks to leave free for the running requests to grow into.
    pub reserve_blocks: u32,
}

/// Admitted requests with their ids, in queue order; each holds blocks for its prompt.
pub type NextBatch = Option<Vec<(u64, Entry)>>;

/// How the HTTP side puts requests in the queue (cheap to clone).
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Entry>,
    waiting: Arc<AtomicUsize>,
}

impl QueueHandle {
    pub fn append(&self, entry: Entry) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        // A failed send means the loop is gone (shutdown): the entry's dropped sender tells its
        // stream so.
        if self.tx.send(entry).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        crate::metrics::queue_size(self.len());
    }

    /// Requests waiting for admission.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The waiting requests, in admission order, with their ids.
pub struct Queue {
    entries: VecDeque<(u64, Entry)>,
    next_request_id: u64,
    rx: mpsc::UnboundedReceiver<Entry>,
    waiting: Arc<AtomicUsize>,
}

impl Queue {
    pub fn new() -> (Self, QueueHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        (Self { entries: VecDeque::new(), next_request_id: 0, rx, waiting: waiting.clone() }, QueueHandle { tx, waiting })
    }

    fn push(&mut self, entry: Entry) {
        let id = self.next_request_id;
        self.next_request_id += 1;
        self.entries.push_back((id, entry));
    }

    /// Takes in what the HTTP side appended since the last call.
    pub fn receive(&mut self) {
        while let Ok(entry) = self.rx.try_recv() {
            self.push(entry);
        }
    }

    /// Waits for a request when the queue is empty; false once no handle is left (shutdown).
    pub async fn wait(&mut self) -> bool {
        if !self.entries.is_empty() {
            return true;
        }
        match self.rx.recv().await {
            Some(entry) => {
                self.push(entry);
                true
            }
            None => false,
        }
    }

    /// Puts a preempted request back at the front (it keeps its id).
    pub fn requeue(&mut self, id: u64, entry: Entry) {
        self.entries.push_front((id, entry));
        self.waiting.fetch_add(1, Ordering::Relaxed);
        crate::metrics::queue_size(self.waiting.load(Ordering::Relaxed));
    }

    fn taken(&self, n: usize) {
        if n > 0 {
            self.waiting.fetch_sub(n, Ordering::Relaxed);
            crate::metrics::queue_size(self.waiting.load(Ordering::Relaxed));
        }
    }

    /// Admits requests in order: while the step has prompt budget left and their prompts (and a
    /// step ahead) fit in the free blocks, `limits.reserve_blocks` left over for the running
    /// requests to grow into. Each admitted request holds blocks for its prompt; cancelled ones
    /// are dropped on the way.
    pub fn next_batch(&mut self, allocator: &BlockAllocator, limits: BatchLimits) -> NextBatch {
        let mut taken: Vec<(u64, Entry)> = Vec::new();
        let mut left = 0;
        let mut prefill_tokens = 0u32;
        while let Some((id, mut entry)) = self.entries.pop_front() {
            if entry.is_cancelled() {
                left += 1; // the client left while waiting
                continue;
            }
            let input = entry.fed();
            if prefill_tokens >= limits.prefill_tokens {
                self.entries.push_front((id, entry));
                break;
            }
            // Prompt logprobs need every prompt token computed: no lookup (the blocks are still
            // published for others).
            let prefix = entry.prefix.as_ref().map(|key| Prefix {
                key: key.clone(),
                tokens: if entry.generated.is_empty() { entry.request.input_ids.clone() } else { Arc::new(entry.tokens()) },
                lookup: !entry.request.decoder_input_details || !entry.generated.is_empty(),
            });
            // KV on demand: the prompt and one step ahead now, more as the sequence grows
            // (scheduler `grow`); room is left for the running requests to grow into.
            match allocator.allocate_for(entry.needed_positions(), prefix, limits.reserve_blocks) {
                Some(a) => entry.allocation = Some(a),
                None => {
                    // FIFO: nobody jumps ahead of a request waiting for blocks.
                    self.entries.push_front((id, entry));
                    break;
                }
            }
            prefill_tokens += input - entry.allocation.as_ref().map_or(0, |a| a.cached_tokens);
            entry.fresh = true;
            entry.started.get_or_insert_with(Instant::now);
            taken.push((id, entry));
            if limits.max_size.is_some_and(|m| taken.len() >= m) {
                break;
            }
        }
        self.taken(left + taken.len());
        if taken.is_empty() {
            return None;
        }
        Some(taken)
    }
}

/// The request as the shard sees it, computing `compute` of its fed tokens after the first
/// `cached` (in the cache already: the prefix cache's, or earlier chunks'). A chunk that does not
/// finish the input carries only its own tokens and their cache locations (`input_len` says how
/// long the whole input is), so a long prompt is not resent with every chunk; the chunk that
/// finishes it carries all of it.
pub fn to_pb(id: u64, e: &Entry, cached: u32, compute: u32) -> pb::Request {
    let fed = e.fed();
    let partial = compute > 0 && cached + compute < fed;
    let mut r = request_pb(id, e, if partial { cached..cached + compute } else { 0..fed });
    r.cached_tokens = cached;
    r.compute_tokens = compute;
    r.input_len = if partial { fed } else { 0 };
    r
}

/// The request with the fed tokens in `span` (all of them unless a chunk's) and their cache locations.
fn request_pb(id: u64, e: &Entry, span: std::ops::Range<u32>) -> pb::Request {
    let r = &e.request;
    let a = e.allocation.as_ref().expect("admitted entries hold an allocation");
    let (start, end) = (span.start as usize, span.end as usize);
    let prompt = r.input_ids.len();
    let input_ids = r.input_ids[start.min(prompt)..end.min(prompt)]
        .iter()
        .chain(&e.generated[start.saturating_sub(prompt)..end.saturating_sub(prompt)])
        .copied()
        .collect();
    pb::Request {
        id,
        input_ids,
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: r.parameters.temperature,
            top_k: r.parameters.top_k,
            top_p: r.parameters.top_p,
            typical_p: r.parameters.typical_p,
            do_sample: r.parameters.do_sample,
            seed: r.parameters.seed,
            repetition_penalty: r.parameters.repetition_penalty,
            frequency_penalty: r.parameters.frequency_penalty,
            presence_penalty: r.parameters.presence_penalty,
            watermark: r.parameters.watermark,
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: r.stopping.max_new_tokens,
            ignore_eos_token: r.stopping.ignore_eos_token,
        }),
        blocks: a.blocks.clone(),
        cache_locs: a.cache_locs(span),
        adapter_id: r.adapter_id.clone(),
        // a resumed request's stream has its prompt logprobs already (and its input now holds
        // generated tokens too)
        prefill_logprobs: r.decoder_input_details && e.generated.is_empty(),
        top_n_tokens: r.top_n_tokens,
        cached_tokens: a.cached_tokens,
        generated_tokens: e.generated.len() as u32,
        compute_tokens: 0,
        constrained: e.grammar.is_some(),
        input_len: 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::request::{ValidParameters, ValidStopping};

    pub fn valid_request(input_len: usize, max_new_tokens: u32) -> ValidGenerateRequest {
        ValidGenerateRequest {
            inputs: "x".into(),
            input_ids: Arc::new(vec![2; input_len]),
            parameters: ValidParameters {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                typical_p: 1.0,
                do_sample: false,
                seed: 0,
                repetition_penalty: 1.0,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
                watermark: false,
            },
            stopping: ValidStopping { max_new_tokens, stop_sequences: vec![], ignore_eos_token: false },
            details: false,
            return_full_text: false,
            decoder_input_details: false,
            top_n_tokens: 0,
            best_of: 1,
            adapter_id: None,
            report_seed: false,
            grammar: None,
        }
    }

    pub fn entry(input_len: usize, max_new_tokens: u32) -> (Entry, mpsc::UnboundedReceiver<Result<ShardEvent, InferError>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Entry::new(valid_request(input_len, max_new_tokens), tx), rx)
    }

    #[test]
    fn a_resumed_request_feeds_its_tokens_as_outputs_without_prompt_logprobs() {
        let mut r = valid_request(5, 10);
        r.decoder_input_details = true;
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut e = Entry::new(r, tx);
        let alloc = BlockAllocator::new(4, 16);
        e.allocation = Some(alloc.allocate(16).unwrap());
        assert!(request_pb(0, &e, 0..5).prefill_logprobs);
        e.generated = vec![7, 8, 9];
        let p = request_pb(0, &e, 0..8);
        assert_eq!((p.input_ids.len(), p.generated_tokens, p.prefill_logprobs), (8, 3, false));
        assert_eq!(&p.input_ids[5..], &[7, 8, 9]);
        assert_eq!(p.cache_locs.len(), 8);
        assert_eq!(e.needed_positions(), 9);
        e.generated = vec![1; 9];
        assert_eq!(e.needed_positions(), 14, "never past the last fed position (input + max_new - 2)");
    }

    #[test]
    fn a_chunk_that_does_not_finish_the_input_carries_only_its_tokens() {
        let mut r = valid_request(5, 10);
        Arc::get_mut(&mut r.input_ids).unwrap().copy_from_slice(&[10, 11, 12, 13, 14]);
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut e = Entry::new(r, tx);
        e.allocation = Some(BlockAllocator::new(4, 4).allocate(9).unwrap());
        e.generated = vec![7, 8, 9]; // resumed: 8 tokens fed
        let locs = e.allocation.as_ref().unwrap().cache_locs(0..8);
        let p = to_pb(0, &e, 3, 3); // across the prompt's end
        assert_eq!((p.input_ids, p.cache_locs.as_slice(), p.input_len), (vec![13, 14, 7], &locs[3..6], 8));
        assert_eq!((p.cached_tokens, p.compute_tokens, p.generated_tokens), (3, 3, 3));
        let p = to_pb(0, &e, 0, 2); // within the prompt
        assert_eq!((p.input_ids, p.input_len), (vec![10, 11], 8));
        for (cached, compute) in [(6, 2), (6, 0), (0, 0), (0, 8)] { // the last chunk, or the whole input: all of it
            let p = to_pb(0, &e, cached, compute);
            assert_eq!((p.input_ids, p.cache_locs, p.input_len), (vec![10, 11, 12, 13, 14, 7, 8, 9], locs.clone(), 0));
        }
    }

    const ALL: BatchLimits = BatchLimits { max_size: None, prefill_tokens: 1000, reserve_blocks: 0 };

    /// A queue with requests appended through its handle, taken in.
    fn queue_of(entries: Vec<Entry>) -> (Queue, QueueHandle) {
        let (mut q, h) = Queue::new();
        for e in entries {
            h.append(e);
        }
        q.receive();
        (q, h)
    }

    #[test]
    fn fifo_with_ids_and_cache_locs() {
        let alloc = BlockAllocator::new(100, 16);
        let (e1, _r1) = entry(3, 5);
        let (e2, _r2) = entry(20, 5);
        let (mut q, h) = queue_of(vec![e1, e2]);
        assert_eq!(h.len(), 2);
        let entries = q.next_batch(&alloc, ALL).unwrap();
        assert_eq!(h.len(), 0);
        assert_eq!(entries.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![0, 1]);
        let requests: Vec<pb::Request> = entries.iter().map(|(id, e)| request_pb(*id, e, 0..e.fed())).collect();
        assert_eq!(requests[0].blocks, vec![0]);
        assert_eq!(requests[0].cache_locs, vec![0, 1, 2]);
        assert_eq!(requests[1].blocks, vec![1, 2]);
        assert_eq!(requests[1].cache_locs.len(), 20);
        assert!(q.next_batch(&alloc, ALL).is_none());
    }

    #[test]
    fn admission_stops_once_the_prefill_budget_is_spent() {
        let alloc = BlockAllocator::new(100, 16);
        let (entries, _receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| entry(10, 1)).unzip(); // receivers kept: live entries
        let (mut q, _h) = queue_of(entries);
        // 15 tokens of budget: the first prompt fits, the second starts in it (chunked), the third waits
        let first = q.next_batch(&alloc, BatchLimits { max_size: None, prefill_tokens: 15, reserve_blocks: 0 }).unwrap();
        assert_eq!(first.len(), 2);
        let second = q.next_batch(&alloc, BatchLimits { max_size: None, prefill_tokens: 1, reserve_blocks: 0 }).unwrap();
        assert_eq!(second.len(), 1);
        assert!(q.next_batch(&alloc, BatchLimits { max_size: None, prefill_tokens: 0, reserve_blocks: 0 }).is_none());
    }

    #[test]
    fn waits_for_blocks_in_order() {
        let alloc = BlockAllocator::new(2, 16);
        let (e1, _r1) = entry(20, 10); // 2 blocks
        let (e2, _r2) = entry(1, 1); // 1 block
        let (mut q, _h) = queue_of(vec![e1, e2]);
        let first = q.next_batch(&alloc, ALL).unwrap();
        assert_eq!(first.len(), 1);
        assert!(q.next_batch(&alloc, ALL).is_none(), "no blocks left");
        drop(first);
        let second = q.next_batch(&alloc, ALL).unwrap();
        assert_eq!(second[0].0, 1);
        drop(second);
        assert_eq!(alloc.stats().free, 2);
    }

    #[test]
    fn cancelled_entries_are_skipped() {
        let alloc = BlockAllocator::new(10, 16);
        let (e1, r1) = entry(3, 1);
        let (e2, _r2) = entry(3, 1);
        let (mut q, h) = queue_of(vec![e1, e2]);
        drop(r1);
        let entries = q.next_batch(&alloc, ALL).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, 1);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn max_size_caps_admission() {
        let alloc = BlockAllocator::new(10, 16);
        let (entries, _keep): (Vec<_>, Vec<_>) = (0..3).map(|_| entry(1, 1)).unzip();
        let (mut q, h) = queue_of(entries);
        let entries = q.next_batch(&alloc, BatchLimits { max_size: Some(2), prefill_tokens: 100, reserve_blocks: 0 }).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(h.len(), 1);
    }
}
