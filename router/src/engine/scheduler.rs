//! The continuous batching loop. Each step is one shard call within a token budget
//! (`--max-batch-tokens`): a token for every running request first, then prompts in arrival
//! order, in chunks that fill what is left of the budget (at most `--max-batch-prefill-tokens`);
//! a long prompt spans several steps and its first token comes from its last chunk. Between
//! steps the loop grows running requests' KV blocks (preempting the youngest when the cache is
//! full), admits waiting requests and keeps the shards' batch in step with its entries; finished,
//! failed and cancelled requests leave it and their blocks are freed by drop.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Instant;

use crate::shard::client::{self, ClientError, ShardedClient};
use crate::error::InferError;
use crate::shard::pb;
use crate::engine::kv::BlockAllocator;
use crate::engine::queue::{to_pb, BatchLimits, Entry, Queue, ShardEvent};

/// What the loop needs from the shards; the real client, or a fake in tests.
pub trait Shards: Send + 'static {
    /// One step: a token for each row of `batch_ids` (concatenated on the shards), the prompt
    /// chunks of `prefill`; `grants`: blocks appended to requests' tables before it is launched;
    /// `masks`: constrained requests' allowed next tokens; `trace`: a W3C traceparent for the
    /// shard's spans.
    fn step(&mut self, batch_ids: Vec<u64>, grants: Vec<pb::BlockGrant>, prefill: Option<pb::Batch>,
            masks: Vec<pb::TokenMask>, trace: Option<String>) -> impl Future<Output = client::Result<pb::StepResponse>> + Send;
    fn filter_batch(&mut self, id: u64, keep: Vec<u64>) -> impl Future<Output = client::Result<Option<pb::CachedBatch>>> + Send;
    fn clear_cache(&mut self, id: Option<u64>) -> impl Future<Output = client::Result<()>> + Send;
}

impl Shards for ShardedClient {
    fn step(&mut self, batch_ids: Vec<u64>, grants: Vec<pb::BlockGrant>, prefill: Option<pb::Batch>,
            masks: Vec<pb::TokenMask>, trace: Option<String>) -> impl Future<Output = client::Result<pb::StepResponse>> + Send {
        ShardedClient::step(self, batch_ids, grants, prefill, masks, trace)
    }
    fn filter_batch(&mut self, id: u64, keep: Vec<u64>) -> impl Future<Output = client::Result<Option<pb::CachedBatch>>> + Send {
        ShardedClient::filter_batch(self, id, keep)
    }
    fn clear_cache(&mut self, id: Option<u64>) -> impl Future<Output = client::Result<()>> + Send {
        ShardedClient::clear_cache(self, id)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Tokens per step: one per running request, then prompt chunks.
    pub max_batch_tokens: u32,
    /// Of those, the most prompt tokens per step.
    pub max_batch_prefill_tokens: u32,
    /// Requests per running batch (decoding and prefilling).
    pub max_batch_size: Option<usize>,
}

impl SchedulerConfig {
    /// Prompt tokens a step with `decoding` running rows has room for.
    fn prefill_budget(&self, decoding: usize) -> u32 {
        self.max_batch_prefill_tokens.min(self.max_batch_tokens.saturating_sub(decoding as u32))
    }
}

type Entries = HashMap<u64, Entry>;

/// An admitted request whose prompt (its fed tokens) is being computed, chunk by chunk.
struct Prompt {
    id: u64,
    entry: Entry,
    /// Fed tokens whose keys/values are in the cache or on their way (cached prefix + chunks sent).
    done: u32,
    /// Chunks sent so far.
    chunks: u32,
}

/// The loop's state between steps.
#[derive(Default)]
struct Batching {
    /// Requests with rows in the shards' batch (or joining it with their last chunk).
    running: Entries,
    /// Admitted requests with prompt tokens still to compute, in arrival order.
    prompts: VecDeque<Prompt>,
    /// The shards' batch of running rows.
    cached: Option<pb::CachedBatch>,
    next_batch_id: u64,
    /// When the last step without prompts answered (the router's own time until the next call
    /// is measured).
    answered: Option<Instant>,
}

/// What one step carries besides the running rows.
#[derive(Default)]
struct StepPrompts {
    batch: Option<pb::Batch>,
    tokens: u32,
    partial: usize,
    completed: usize,
}

/// The loop owns the waiting queue and the running requests; it matches, allocates, grows and
/// preempts through the block allocator in the same synchronous part of each step. It ends when
/// every queue handle is gone.
pub async fn batching_loop<S: Shards>(mut shards: S, mut queue: Queue, allocator: BlockAllocator, cfg: SchedulerConfig) {
    let mut st = Batching::default();
    loop {
        queue.receive();
        st.running.retain(|_, e| !e.is_cancelled());
        st.prompts.retain(|p| !p.entry.is_cancelled());
        let grants = grow(&mut st, &mut queue);
        admit(&mut st, &mut queue, &allocator, &cfg);
        if st.running.is_empty() && st.prompts.is_empty() {
            // Idle: wait for a request.
            crate::metrics::batch_size(0);
            if !queue.wait().await {
                return;
            }
            continue;
        }
        st.cached = update(&mut shards, st.cached.take(), &mut st.running).await;
        let decoding = st.cached.as_ref().map_or(0, |b| b.request_ids.len());
        let prompts = chunks(&mut st, &cfg, decoding);
        if st.cached.is_none() && prompts.batch.is_none() {
            if !st.running.is_empty() {
                // Requests the shards' batch does not hold: nothing would ever answer them.
                tracing::error!(requests = ?st.running.keys().collect::<Vec<_>>(), "running requests missing from the shards' batch");
                let e = ClientError::Shard { code: pb::ErrorCode::BatchNotFound, message: "request lost by the shards".into(), request_ids: vec![] };
                fail_all(&mut st.running, &e);
            }
            tokio::task::yield_now().await; // nothing runnable now (everything left was cancelled)
            continue;
        }
        step(&mut shards, &mut st, grants, prompts, decoding).await;
    }
}

/// Admits waiting requests while this step has prompt budget left beyond the prompts already
/// admitted (the last one admitted may be chunked over the next steps).
fn admit(st: &mut Batching, queue: &mut Queue, allocator: &BlockAllocator, cfg: &SchedulerConfig) {
    let rows = st.running.len() + st.prompts.len();
    if cfg.max_batch_size.is_some_and(|m| rows >= m) {
        return;
    }
    let pending: u32 = st.prompts.iter().map(|p| p.entry.fed() - p.done).sum();
    let budget = cfg.prefill_budget(st.running.len()).saturating_sub(pending);
    if budget == 0 {
        return;
    }
    let limits = BatchLimits {
        max_size: cfg.max_batch_size.map(|m| m - rows),
        prefill_tokens: budget,
        reserve_blocks: st.running.len() as u32, // a block each to grow into
    };
    for (id, entry) in queue.next_batch(allocator, limits).into_iter().flatten() {
        let done = entry.allocation.as_ref().map_or(0, |a| a.cached_tokens);
        st.prompts.push_back(Prompt { id, entry, done, chunks: 0 });
    }
}

/// The whole input's length of a request sent to the shard (a chunk's carries only its own tokens).
fn input_len(r: &pb::Request) -> u32 {
    if r.input_len > 0 { r.input_len } else { r.input_ids.len() as u32 }
}

/// This step's prompt chunks, oldest prompt first, within the budget left by the decoding rows.
/// A prompt whose last chunk goes joins the running requests (its first token arrives from this
/// step, or from the next call when the shards run a step ahead). A prompt asking for prompt
/// logprobs is never split: it goes whole, alone over the budget if it must.
fn chunks(st: &mut Batching, cfg: &SchedulerConfig, decoding: usize) -> StepPrompts {
    let mut budget = cfg.prefill_budget(decoding);
    let mut out = StepPrompts::default();
    let mut requests = Vec::new();
    while let Some(p) = st.prompts.front() {
        let left = p.entry.fed() - p.done;
        let whole = p.entry.request.decoder_input_details && p.entry.generated.is_empty();
        let n = if whole {
            if requests.is_empty() || left <= budget { left } else { break }
        } else {
            left.min(budget)
        };
        if n == 0 {
            break;
        }
        let mut p = st.prompts.pop_front().expect("front exists");
        requests.push(to_pb(p.id, &p.entry, p.done, n));
        p.done += n;
        p.chunks += 1;
        p.entry.kv_valid = p.done; // in the cache once this step ran (steps run in order)
        budget = budget.saturating_sub(n);
        out.tokens += n;
        if p.done < p.entry.fed() {
            out.partial += 1;
            st.prompts.push_front(p);
            break;
        }
        out.completed += usize::from(p.chunks > 1);
        st.running.insert(p.id, p.entry);
    }
    if !requests.is_empty() {
        let id = st.next_batch_id;
        st.next_batch_id += 1;
        out.batch = Some(pb::Batch {
            id,
            size: requests.len() as u32,
            max_tokens: requests.iter().map(input_len).sum(),
            max_blocks: requests.iter().map(|r| r.blocks.len() as u32).max().unwrap_or(0),
            requests,
        });
    }
    out
}

/// KV on demand: grows every running request's blocks to what the next call may write (oldest
/// first). When the cache is full, the youngest request is preempted (prompts not yet running
/// first): its blocks go back (what it computed stays in the prefix cache), it returns to the
/// front of the queue with its generated tokens, and its stream just pauses until it is admitted
/// again. Returns the blocks to send with the call; preempted requests leave `running` (and the
/// shards' batch at the next `update`).
fn grow(st: &mut Batching, queue: &mut Queue) -> Vec<pb::BlockGrant> {
    let entries = &mut st.running;
    // Most steps cross no block boundary: nothing to order or ask for.
    if entries.values().all(|e| e.allocation.as_ref().is_none_or(|a| a.holds(e.needed_positions()))) {
        return Vec::new();
    }
    let mut order: Vec<u64> = entries.keys().copied().collect();
    order.sort_by_key(|id| (entries[id].started, *id));
    let mut grants = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let e = entries.get_mut(&id).expect("ordered entries are running");
        let need = e.needed_positions();
        let Some(a) = e.allocation.as_mut() else { i += 1; continue };
        match a.grow(need) {
            Some(added) => {
                if !added.is_empty() {
                    grants.push(pb::BlockGrant { request_id: id, blocks: added });
                }
                i += 1;
            }
            None => {
                if let Some(mut p) = st.prompts.pop_back() {
                    p.entry.preempt();
                    tracing::debug!(request = p.id, "preempted while prefilling: KV cache full");
                    queue.requeue(p.id, p.entry);
                    continue;
                }
                let victim = order.pop().expect("the list holds `id`");
                let mut v = entries.remove(&victim).expect("ordered entries are running");
                grants.retain(|g| g.request_id != victim);
                v.preempt();
                tracing::debug!(request = victim, generated = v.generated.len(), "preempted: KV cache full");
                queue.requeue(victim, v);
            }
        }
    }
    grants
}

/// One shard call and what its answer does: tokens to their requests, the batch kept in step
/// with the entries; or, when the call failed, its batches cleared on the shards and every
/// request in them (and every prompt in progress) failed.
async fn step<S: Shards>(shards: &mut S, st: &mut Batching, grants: Vec<pb::BlockGrant>, prompts: StepPrompts, decoding: usize) {
    let batch_ids: Vec<u64> = st.cached.take().map(|b| b.id).into_iter().collect();
    let new_id = prompts.batch.as_ref().map(|b| b.id);
    let with_prompts = prompts.batch.is_some();
    crate::metrics::step(decoding, prompts.tokens, prompts.batch.as_ref().map_or(0, |b| b.requests.len()), prompts.partial,
                         prompts.completed);
    crate::metrics::batch_size(st.running.len());
    if let Some(t) = st.answered.take().filter(|_| !with_prompts) {
        crate::metrics::router_step_duration(t.elapsed());
    }
    let t0 = Instant::now();
    // "prefill": a step with prompt chunks (and decoding rows); "decode": decoding rows only
    let span = crate::telemetry::batch_span(if with_prompts { "prefill" } else { "decode" },
                                            st.running.values().chain(st.prompts.iter().map(|p| &p.entry)).filter_map(|e| e.span.as_ref()));
    let masks = masks(&mut st.running);
    let result = shards.step(batch_ids.clone(), grants, prompts.batch, masks, span.as_ref().map(|s| s.1.clone())).await;
    drop(span);
    if with_prompts {
        crate::metrics::prefill_duration(t0.elapsed());
    } else {
        crate::metrics::decode_duration(t0.elapsed());
        st.answered = Some(Instant::now());
    }
    match result {
        Ok(r) => {
            send_generations(r.generations, &mut st.running, &mut st.prompts);
            st.cached = update(shards, r.batch, &mut st.running).await;
        }
        Err(e) => {
            tracing::error!(batches = ?batch_ids, "step failed: {e}");
            for id in batch_ids.into_iter().chain(new_id) {
                let _ = shards.clear_cache(Some(id)).await;
            }
            fail_all(&mut st.running, &e);
            let mut prompts: Entries = st.prompts.drain(..).map(|p| (p.id, p.entry)).collect();
            fail_all(&mut prompts, &e);
        }
    }
}

/// Threads for mask computation: half the cores, so that a shard on the same machine's CPU (the
/// CPU path) keeps the rest; one on a 2-core machine.
fn mask_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads((cores / 2).max(1))
            .thread_name(|i| format!("grammar-mask-{i}"))
            .build()
            .expect("a thread pool for grammar masks")
    })
}

/// The next-token masks of the constrained requests (running, or joining with their last
/// prompt chunk), computed in parallel across requests. A grammar that fails fails its request
/// alone.
fn masks(entries: &mut Entries) -> Vec<pb::TokenMask> {
    use rayon::prelude::*;
    let t0 = Instant::now();
    let mut constrained: Vec<(u64, &mut crate::engine::grammar::Constraint)> =
        entries.iter_mut().filter_map(|(id, e)| e.grammar.as_mut().map(|g| (*id, g))).collect();
    if constrained.is_empty() {
        return Vec::new();
    }
    let computed: Vec<(u64, Result<Vec<u8>, String>)> =
        mask_pool().install(|| constrained.par_iter_mut().map(|(id, g)| (*id, g.mask())).collect());
    let mut out = Vec::with_capacity(computed.len());
    for (id, mask) in computed {
        match mask {
            Ok(allowed) => out.push(pb::TokenMask { request_id: id, allowed }),
            Err(e) => {
                let e = ClientError::Shard { code: pb::ErrorCode::InvalidRequest, message: format!("grammar: {e}"), request_ids: vec![id] };
                let mut broken: Entries = entries.remove_entry(&id).into_iter().collect();
                fail_all(&mut broken, &e);
            }
        }
    }
    crate::metrics::grammar_masks(t0.elapsed());
    out
}

/// Keeps only the requests that still have an entry; drops the batch when none do.
async fn update<S: Shards>(shards: &mut S, batch: Option<pb::CachedBatch>, entries: &mut Entries) -> Option<pb::CachedBatch> {
    let batch = batch?;
    let keep: Vec<u64> = batch.request_ids.iter().copied().filter(|id| entries.contains_key(id)).collect();
    if keep.len() == batch.request_ids.len() {
        return Some(batch);
    }
    if keep.is_empty() {
        if let Err(e) = shards.clear_cache(Some(batch.id)).await {
            tracing::warn!(batch = batch.id, "clear cache failed: {e}");
        }
        return None;
    }
    match shards.filter_batch(batch.id, keep.clone()).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(batch = batch.id, "filter failed: {e}");
            let _ = shards.clear_cache(Some(batch.id)).await;
            let mut failed: Entries = keep.iter().filter_map(|id| entries.remove_entry(id)).collect();
            fail_all(&mut failed, &e);
            None
        }
    }
}

/// Sends each generation to its request; finished or abandoned requests leave `entries`
/// (their blocks are freed as the entry drops). A prompt the shards refused fails alone.
fn send_generations(generations: Vec<pb::Generation>, entries: &mut Entries, prompts: &mut VecDeque<Prompt>) {
    for g in generations {
        if let Some(err) = g.error {
            // This request alone failed; the rest of the step went on.
            let code = pb::ErrorCode::try_from(err.code).unwrap_or(pb::ErrorCode::Internal);
            let e = ClientError::Shard { code, message: err.message, request_ids: err.request_ids };
            let mut failed: Entries = entries.remove_entry(&g.request_id).into_iter().collect();
            if let Some(i) = prompts.iter().position(|p| p.id == g.request_id) {
                let p = prompts.remove(i).expect("position is in range");
                failed.insert(p.id, p.entry);
            }
            fail_all(&mut failed, &e);
            continue;
        }
        let Some(entry) = entries.get_mut(&g.request_id) else { continue };
        let tokens = g.tokens.unwrap_or_default();
        let (Some(&id), Some(&logprob)) = (tokens.ids.first(), tokens.logprobs.first()) else {
            let e = ClientError::Shard { code: pb::ErrorCode::Internal, message: "generation without a token".into(), request_ids: vec![] };
            let mut failed: Entries = entries.remove_entry(&g.request_id).into_iter().collect();
            fail_all(&mut failed, &e);
            continue;
        };
        let mut finish = match pb::FinishReason::try_from(g.finish_reason) {
            Ok(pb::FinishReason::Unspecified) | Err(_) => None,
            Ok(f) => Some(f),
        };
        if let Some(grammar) = entry.grammar.as_mut() {
            if let Err(e) = grammar.consume(id) {
                let e = ClientError::Shard { code: pb::ErrorCode::Internal, message: format!("grammar: token {id}: {e}"), request_ids: vec![] };
                let mut failed: Entries = entries.remove_entry(&g.request_id).into_iter().collect();
                fail_all(&mut failed, &e);
                continue;
            }
            if grammar.is_done() && finish.is_none() {
                finish = Some(pb::FinishReason::EosToken); // the grammar is complete: nothing more may follow
            }
        }
        entry.record_token(id);
        let event = ShardEvent::Token {
            cached: entry.cached_tokens(),
            id,
            logprob,
            finish,
            seed: g.seed,
            top: g.top_tokens.into_iter().next(),
            prefill: g.prefill_tokens.filter(|t| !t.ids.is_empty()),
            queued: entry.queued,
            started: entry.started.unwrap_or(entry.queued),
        };
        if entry.events.send(Ok(event)).is_err() || finish.is_some() {
            entries.remove(&g.request_id);
        }
    }
}

/// Fails the requests. What they computed is not offered to the prefix cache: after a failure
/// their keys/values may never have been written.
fn fail_all(entries: &mut Entries, e: &ClientError) {
    for (_, mut entry) in entries.drain() {
        entry.prefix = None;
        let _ = entry.events.send(Err(InferError::from(e)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv::BlockAllocator;
    use crate::error::ErrorKind;
    use crate::engine::queue::tests::entry;
    use crate::engine::queue::QueueHandle;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A fake shard: each request generates token ids input_len, input_len+1, ... and stops at max_new_tokens.
    #[derive(Default)]
    struct FakeState {
        batches: HashMap<u64, Vec<(u64, u32, u32, u32)>>, // id -> (request id, next token, generated, max_new)
        fail_prefill: bool,
        reject_input_len: Option<u32>, // requests with this prompt length fail alone
        steps: Vec<(Vec<u64>, u32)>, // (decoding request ids, prompt tokens computed) of each step
        prefills: Vec<(u64, u32, Vec<u32>)>, // (request id, cached_tokens, blocks) of each prompt chunk
        progress: HashMap<u64, u32>, // prompt tokens computed so far of prompts in progress
        chunk_errors: Vec<u64>, // prompts whose chunks came out of order, past their blocks, or carried the wrong tokens
        caps: HashMap<u64, u32>, // KV positions each request's blocks hold
        kv_overruns: Vec<u64>, // requests a step would have written past their blocks
        resumed: Vec<(u64, u32)>, // (request id, generated_tokens) of re-admitted requests
    }
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    fn cached(id: u64, rows: &[(u64, u32, u32, u32)]) -> Option<pb::CachedBatch> {
        Some(pb::CachedBatch { id, request_ids: rows.iter().map(|r| r.0).collect(), size: rows.len() as u32, max_tokens: 0 })
    }
    fn gens(rows: &mut [(u64, u32, u32, u32)]) -> Vec<pb::Generation> {
        rows.iter_mut()
            .map(|r| {
                let tok = r.1;
                r.1 += 1;
                r.2 += 1;
                let finish = if r.2 >= r.3 { pb::FinishReason::Length } else { pb::FinishReason::Unspecified };
                pb::Generation {
                    request_id: r.0,
                    tokens: Some(pb::Tokens { ids: vec![tok], logprobs: vec![-0.5] }),
                    finish_reason: finish as i32,
                    ..Default::default()
                }
            })
            .collect()
    }

    impl Shards for Fake {
        async fn step(&mut self, batch_ids: Vec<u64>, grants: Vec<pb::BlockGrant>, prefill: Option<pb::Batch>, _masks: Vec<pb::TokenMask>,
                      _trace: Option<String>)
                      -> client::Result<pb::StepResponse> {
            tokio::time::sleep(Duration::from_micros(500)).await; // a step takes time, as on a real shard
            let mut s = self.0.lock().unwrap();
            if s.fail_prefill && prefill.is_some() {
                return Err(ClientError::Shard { code: pb::ErrorCode::OutOfMemory, message: "boom".into(), request_ids: vec![] });
            }
            for g in grants {
                *s.caps.get_mut(&g.request_id).expect("blocks granted to an unknown request") += 16 * g.blocks.len() as u32;
            }
            let mut rows = vec![];
            for id in &batch_ids {
                rows.extend(s.batches.remove(id).expect("a step of an unknown batch"));
            }
            // This step feeds the last token (position next - 1); a shard running ahead also
            // feeds the one it samples (position next) unless that is the last.
            for &(id, next, generated, max_new) in &rows {
                let last_fed = next - generated + max_new - 2;
                if generated < max_new && s.caps[&id] < (next + 1).min(last_fed + 1) {
                    s.kv_overruns.push(id);
                }
            }
            let decoding: Vec<u64> = rows.iter().map(|r| r.0).collect();
            let mut generations = gens(&mut rows);
            let mut prompt_tokens = 0;
            let out_id = batch_ids.first().copied().or(prefill.as_ref().map(|b| b.id)).unwrap_or(0);
            for r in prefill.map(|b| b.requests).unwrap_or_default() {
                let len = input_len(&r);
                if Some(len) == s.reject_input_len {
                    generations.push(pb::Generation {
                        request_id: r.id,
                        error: Some(pb::ShardError { code: pb::ErrorCode::InvalidRequest as i32, message: "bad".into(), request_ids: vec![r.id] }),
                        ..Default::default()
                    });
                    continue;
                }
                let end = if r.compute_tokens > 0 { r.cached_tokens + r.compute_tokens } else { len };
                // chunks of a prompt come in order, each after the last; one that does not finish
                // the prompt carries only its own tokens, the last all of them
                let carried = if end < len { end - r.cached_tokens } else { len };
                if s.progress.get(&r.id).is_some_and(|&done| done != r.cached_tokens) || end > len
                    || r.blocks.len() as u32 * 16 < end || r.input_ids.len() as u32 != carried
                    || r.cache_locs.len() != r.input_ids.len() || (r.input_len > 0) != (end < len) {
                    s.chunk_errors.push(r.id);
                }
                s.prefills.push((r.id, r.cached_tokens, r.blocks.clone()));
                s.caps.insert(r.id, r.blocks.len() as u32 * 16);
                prompt_tokens += end - r.cached_tokens;
                if end < len {
                    s.progress.insert(r.id, end);
                    continue;
                }
                s.progress.remove(&r.id);
                if r.generated_tokens > 0 {
                    s.resumed.push((r.id, r.generated_tokens));
                }
                let mut row = [(r.id, len, r.generated_tokens, r.stopping_parameters.as_ref().unwrap().max_new_tokens)];
                generations.extend(gens(&mut row));
                rows.push(row[0]);
            }
            s.steps.push((decoding, prompt_tokens));
            rows.retain(|r| r.2 < r.3);
            let c = if rows.is_empty() { None } else { cached(out_id, &rows) };
            if !rows.is_empty() {
                s.batches.insert(out_id, rows);
            }
            Ok(pb::StepResponse { generations, batch: c, ..Default::default() })
        }
        async fn filter_batch(&mut self, id: u64, keep: Vec<u64>) -> client::Result<Option<pb::CachedBatch>> {
            let mut s = self.0.lock().unwrap();
            let rows = s.batches.get_mut(&id).unwrap();
            rows.retain(|r| keep.contains(&r.0));
            Ok(cached(id, rows))
        }
        async fn clear_cache(&mut self, id: Option<u64>) -> client::Result<()> {
            let mut s = self.0.lock().unwrap();
            match id {
                Some(id) => { s.batches.remove(&id); }
                None => s.batches.clear(),
            }
            Ok(())
        }
    }

    async fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Result<ShardEvent, InferError>>) -> Result<Vec<u32>, InferError> {
        let mut out = vec![];
        while let Some(ev) = rx.recv().await {
            let ShardEvent::Token { id, finish, .. } = ev?;
            out.push(id);
            if finish.is_some() {
                break;
            }
        }
        Ok(out)
    }

    fn start(fake: Fake, blocks: u32) -> (QueueHandle, BlockAllocator) {
        start_with(fake, blocks, 1000)
    }

    /// `budget`: tokens per step (and prompt tokens per step).
    fn start_with(fake: Fake, blocks: u32, budget: u32) -> (QueueHandle, BlockAllocator) {
        let alloc = BlockAllocator::new(blocks, 16);
        let (queue, handle) = Queue::new();
        let cfg = SchedulerConfig { max_batch_tokens: budget, max_batch_prefill_tokens: budget, max_batch_size: None };
        tokio::spawn(batching_loop(fake, queue, alloc.clone(), cfg));
        (handle, alloc)
    }

    #[tokio::test]
    async fn every_request_gets_all_its_tokens_and_blocks_come_back() {
        let fake = Fake::default();
        let (queue, alloc) = start(fake.clone(), 64);
        let mut rxs = vec![];
        for (len, n) in [(3, 5), (7, 2), (1, 9)] {
            let (e, rx) = entry(len, n);
            queue.append(e);
            rxs.push((len as u32, n, rx));
        }
        for (len, n, rx) in rxs {
            let toks = collect(rx).await.unwrap();
            assert_eq!(toks, (len..len + n).collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alloc.stats().free, 64);
        assert!(fake.0.lock().unwrap().batches.is_empty(), "finished batches are cleared");
    }

    #[tokio::test]
    async fn a_repeated_prompt_reads_the_cached_prefix_and_every_reference_returns() {
        let fake = Fake::default();
        let (queue, alloc) = start(fake.clone(), 64);
        for _ in 0..2 {
            let (mut e, rx) = entry(40, 3); // 40 prompt tokens: two full blocks can be shared
            e.prefix = Some("".into());
            queue.append(e);
            assert_eq!(collect(rx).await.unwrap(), vec![40, 41, 42]);
        }
        let (mut other, rx) = entry(40, 3);
        other.prefix = Some("lora@1".into());
        queue.append(other);
        collect(rx).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let p = fake.0.lock().unwrap().prefills.clone();
        assert_eq!((p[0].1, p[1].1, p[2].1), (0, 32, 0), "a hit for the same key only, leaving a token to compute");
        assert_eq!(p[1].2[..2], p[0].2[..2], "the shared blocks are the first request's");
        let stats = alloc.stats();
        assert_eq!(stats.free, 64, "every reference returned");
        assert!(stats.cached >= 2, "the published blocks stay cached");
    }

    #[tokio::test]
    async fn a_full_cache_preempts_the_youngest_and_everyone_finishes_in_order() {
        // 12 blocks of 16; each request needs ~6 by its end (20 prompt + 70 new): at most two
        // fit, so the later ones wait or are preempted and resumed.
        let fake = Fake::default();
        let (queue, alloc) = start(fake.clone(), 12);
        let mut rxs = vec![];
        for _ in 0..4 {
            let (e, rx) = entry(20, 70);
            queue.append(e);
            rxs.push(rx);
        }
        for rx in rxs {
            assert_eq!(collect(rx).await.unwrap(), (20..90).collect::<Vec<_>>(), "tokens continue across a preemption");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = fake.0.lock().unwrap();
        assert!(s.kv_overruns.is_empty(), "a step would have written past its blocks: {:?}", s.kv_overruns);
        assert!(!s.resumed.is_empty(), "the cache was too small for all: someone was preempted and resumed");
        assert!(s.resumed.iter().all(|&(_, g)| g > 0 && g < 70));
        assert!(s.resumed.iter().all(|&(id, _)| id >= 2), "the two oldest fit and are never preempted: {:?}", s.resumed);
        drop(s);
        assert_eq!(alloc.stats().free, 12);
    }

    #[tokio::test]
    async fn a_long_prompt_is_chunked_into_steps_beside_the_decoding_rows() {
        let fake = Fake::default();
        let (queue, alloc) = start_with(fake.clone(), 64, 8); // 8 tokens per step
        let (a, a_rx) = entry(2, 40);
        queue.append(a);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (b, b_rx) = entry(50, 3);
        queue.append(b);
        assert_eq!(collect(b_rx).await.unwrap(), vec![50, 51, 52], "the first token comes from the last chunk");
        assert_eq!(collect(a_rx).await.unwrap(), (2..42).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = fake.0.lock().unwrap();
        assert!(s.chunk_errors.is_empty(), "chunks out of order, past their blocks or with the wrong tokens: {:?}", s.chunk_errors);
        assert!(s.steps.iter().all(|(rows, prompt)| rows.len() as u32 + prompt <= 8), "every step within the budget: {:?}", s.steps);
        let chunked: Vec<_> = s.steps[1..].iter().filter(|(_, p)| *p > 0).collect(); // after a's own prompt
        assert!(chunked.len() >= 7, "50 prompt tokens at most 7 per step: {:?}", s.steps);
        assert!(chunked.iter().all(|(rows, _)| rows.contains(&0)), "the running request decodes in every step with chunks");
        assert_eq!(s.steps.iter().map(|(_, p)| p).sum::<u32>(), 52, "each prompt token computed once (and a's two)");
        drop(s);
        assert_eq!(alloc.stats().free, 64);
    }

    #[tokio::test]
    async fn cached_blocks_are_evicted_when_a_prompt_needs_them() {
        let fake = Fake::default();
        let (queue, alloc) = start(fake.clone(), 8);
        let run = |tokens: u32, len: usize| {
            let (mut e, rx) = entry(len, 2);
            Arc::get_mut(&mut e.request).unwrap().input_ids = Arc::new(vec![tokens; len]);
            e.prefix = Some("".into());
            queue.append(e);
            collect(rx)
        };
        run(2, 40).await.unwrap(); // publishes two full blocks
        assert_eq!(alloc.stats().cached, 2);
        run(3, 110).await.unwrap(); // 111 positions: 7 of the 8 blocks, one of them cached before
        run(2, 40).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let p = fake.0.lock().unwrap().prefills.clone();
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), vec![0, 0, 16], "the tail block was evicted, the head kept");
        assert_eq!(alloc.stats().free, 8, "every reference returned");
    }

    #[tokio::test]
    async fn late_request_joins_the_running_batch() {
        let fake = Fake::default();
        let (queue, _alloc) = start(fake.clone(), 64);
        let (long, long_rx) = entry(2, 50);
        queue.append(long);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (short, short_rx) = entry(2, 3);
        queue.append(short);
        let short_toks = collect(short_rx).await.unwrap();
        assert_eq!(short_toks.len(), 3);
        assert_eq!(collect(long_rx).await.unwrap().len(), 50);
        let steps = fake.0.lock().unwrap().steps.clone();
        assert!(steps.iter().any(|s| s.0.len() == 2), "both requests decoded in one step");
    }

    #[tokio::test]
    async fn cancelled_request_is_filtered_and_freed() {
        let fake = Fake::default();
        let (queue, alloc) = start(fake.clone(), 64);
        let (a, a_rx) = entry(2, 1000);
        let (b, b_rx) = entry(2, 20);
        queue.append(a);
        queue.append(b);
        drop(a_rx);
        assert_eq!(collect(b_rx).await.unwrap().len(), 20);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alloc.stats().free, 64);
        let steps = fake.0.lock().unwrap().steps.clone();
        assert!(steps.last().unwrap().0.len() == 1);
    }

    #[tokio::test]
    async fn shard_error_fails_requests_and_frees_blocks() {
        let fake = Fake::default();
        fake.0.lock().unwrap().fail_prefill = true;
        let (queue, alloc) = start(fake.clone(), 64);
        let (e, rx) = entry(4, 4);
        queue.append(e);
        assert!(matches!(collect(rx).await, Err(InferError::Shard { code: pb::ErrorCode::OutOfMemory, .. })));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alloc.stats().free, 64);
        // The loop keeps serving after a failure.
        fake.0.lock().unwrap().fail_prefill = false;
        let (e, rx) = entry(4, 4);
        queue.append(e);
        assert_eq!(collect(rx).await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_request_the_shard_rejects_fails_alone() {
        let fake = Fake::default();
        fake.0.lock().unwrap().reject_input_len = Some(13);
        let (queue, alloc) = start(fake.clone(), 64);
        let (bad, bad_rx) = entry(13, 4);
        let (good, good_rx) = entry(5, 4);
        queue.append(bad);
        queue.append(good);
        let err = collect(bad_rx).await.unwrap_err();
        assert!(matches!(err, InferError::Shard { code: pb::ErrorCode::InvalidRequest, .. }));
        assert_eq!(err.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(collect(good_rx).await.unwrap().len(), 4);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alloc.stats().free, 64);
    }

    #[tokio::test]
    async fn requests_wait_for_blocks_instead_of_failing() {
        let fake = Fake::default();
        let (queue, alloc) = start(fake.clone(), 2); // 32 tokens of KV
        let mut rxs = vec![];
        for _ in 0..4 {
            let (e, rx) = entry(10, 10); // 20 tokens -> 2 blocks: one request at a time
            queue.append(e);
            rxs.push(rx);
        }
        for rx in rxs {
            assert_eq!(collect(rx).await.unwrap().len(), 10);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(alloc.stats().free, 2);
    }
}
