//! The continuous batching loop. It owns the running batch and its entries: between decode
//! steps it admits waiting requests (one prefill within the token budget) and merges them in;
//! finished, failed and cancelled requests are filtered out and their blocks freed by drop.

use std::collections::HashMap;
use std::future::Future;

use crate::client::{self, ClientError, ShardedClient};
use crate::error::InferError;
use crate::pb;
use crate::queue::{BatchLimits, Entry, Queue, ShardEvent};

/// What the loop needs from the shards; the real client, or a fake in tests.
pub trait Shards: Send + 'static {
    /// `trace`: a W3C traceparent for the shard's spans.
    fn prefill(&mut self, batch: pb::Batch, trace: Option<String>) -> impl Future<Output = client::Result<pb::PrefillResponse>> + Send;
    /// `grants`: blocks appended to requests' tables before the step is launched.
    fn decode(&mut self, batches: Vec<pb::CachedBatch>, grants: Vec<pb::BlockGrant>, trace: Option<String>) -> impl Future<Output = client::Result<pb::DecodeResponse>> + Send;
    fn filter_batch(&mut self, id: u64, keep: Vec<u64>) -> impl Future<Output = client::Result<Option<pb::CachedBatch>>> + Send;
    fn clear_cache(&mut self, id: Option<u64>) -> impl Future<Output = client::Result<()>> + Send;
}

impl Shards for ShardedClient {
    fn prefill(&mut self, batch: pb::Batch, trace: Option<String>) -> impl Future<Output = client::Result<pb::PrefillResponse>> + Send {
        ShardedClient::prefill(self, batch, trace)
    }
    fn decode(&mut self, batches: Vec<pb::CachedBatch>, grants: Vec<pb::BlockGrant>, trace: Option<String>) -> impl Future<Output = client::Result<pb::DecodeResponse>> + Send {
        ShardedClient::decode(self, batches, grants, trace)
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
    /// Prompt tokens per prefill.
    pub max_batch_prefill_tokens: u32,
    /// Requests per running batch.
    pub max_batch_size: Option<usize>,
}

type Entries = HashMap<u64, Entry>;

pub async fn batching_loop<S: Shards>(mut shards: S, queue: Queue, cfg: SchedulerConfig) {
    loop {
        queue.notify.notified().await;
        while let Some((entries, batch)) = queue.next_batch(limits(&cfg, 0, 0)).await {
            let mut entries: Entries = entries.into_iter().collect();
            let mut cached = prefill(&mut shards, batch, &mut entries).await;
            // When the last decode answered: the router's own time until the next one is measured
            // (steps without an admission), what the shards wait for unless they run ahead.
            let mut answered: Option<std::time::Instant> = None;
            while let Some(batch) = cached {
                let mut batches = vec![batch];
                let running = entries.len();
                if cfg.max_batch_size.is_none_or(|m| running < m) {
                    let reserve = entries.len() as u32; // a block each to grow into
                    if let Some((new, new_batch)) = queue.next_batch(limits(&cfg, running, reserve)).await {
                        answered = None;
                        let mut new: Entries = new.into_iter().collect();
                        let new_cached = prefill(&mut shards, new_batch, &mut new).await;
                        entries.extend(new);
                        batches.extend(new_cached);
                    }
                }
                let mut live = Vec::with_capacity(batches.len());
                entries.retain(|_, e| !e.is_cancelled());
                let grants = grow(&mut entries, &queue).await;
                for b in batches {
                    live.extend(update(&mut shards, Some(b), &mut entries).await);
                }
                if let Some(t) = answered.take() {
                    crate::metrics::router_step_duration(t.elapsed());
                }
                cached = if live.is_empty() { None } else { decode(&mut shards, live, grants, &mut entries, &mut answered).await };
            }
            debug_assert!(entries.is_empty() || entries.values().all(|e| e.is_cancelled()));
            crate::metrics::batch_size(0);
        }
    }
}

fn limits(cfg: &SchedulerConfig, running: usize, reserve_blocks: u32) -> BatchLimits {
    BatchLimits {
        max_size: cfg.max_batch_size.map(|m| m.saturating_sub(running)),
        prefill_tokens: cfg.max_batch_prefill_tokens,
        reserve_blocks,
    }
}

/// KV on demand: grows every running request's blocks to what the next decode call may write
/// (oldest first). When the cache is full, the youngest running request is preempted: its blocks
/// go back (what it computed stays in the prefix cache), it returns to the front of the queue
/// with its generated tokens, and its stream just pauses until it is admitted again. Returns the
/// blocks to send with the call; the caller filters preempted requests out of the batches.
async fn grow(entries: &mut Entries, queue: &Queue) -> Vec<pb::BlockGrant> {
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
        match a.grow(need).await {
            Some(added) => {
                if !added.is_empty() {
                    grants.push(pb::BlockGrant { request_id: id, blocks: added });
                }
                i += 1;
            }
            None => {
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

async fn prefill<S: Shards>(shards: &mut S, batch: pb::Batch, entries: &mut Entries) -> Option<pb::CachedBatch> {
    let id = batch.id;
    let computed: usize = batch.requests.iter().map(|r| r.input_ids.len() - r.cached_tokens as usize).sum();
    crate::metrics::prefill_tokens(computed as u32, batch.requests.len());
    let t0 = std::time::Instant::now();
    let span = crate::telemetry::batch_span("prefill", entries.values().filter_map(|e| e.span.as_ref()));
    let result = shards.prefill(batch, span.as_ref().map(|s| s.1.clone())).await;
    drop(span);
    crate::metrics::prefill_duration(t0.elapsed());
    settle(shards, "prefill", vec![id], result.map(|r| (r.generations, r.batch)), entries).await
}

/// `answered`: set to when the shards' answer arrived.
async fn decode<S: Shards>(shards: &mut S, batches: Vec<pb::CachedBatch>, grants: Vec<pb::BlockGrant>, entries: &mut Entries,
                           answered: &mut Option<std::time::Instant>) -> Option<pb::CachedBatch> {
    let ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
    crate::metrics::batch_size(entries.len());
    let t0 = std::time::Instant::now();
    let span = crate::telemetry::batch_span("decode", entries.values().filter_map(|e| e.span.as_ref()));
    let result = shards.decode(batches, grants, span.as_ref().map(|s| s.1.clone())).await;
    *answered = Some(std::time::Instant::now());
    drop(span);
    crate::metrics::decode_duration(t0.elapsed());
    settle(shards, "decode", ids, result.map(|r| (r.generations, r.batch)), entries).await
}

/// What a step's answer does: tokens to their requests and the batch kept in step with the
/// entries; or, when the call failed, its batches cleared on the shards and its requests failed.
async fn settle<S: Shards>(shards: &mut S, call: &str, batch_ids: Vec<u64>,
                           result: client::Result<(Vec<pb::Generation>, Option<pb::CachedBatch>)>,
                           entries: &mut Entries) -> Option<pb::CachedBatch> {
    match result {
        Ok((generations, batch)) => {
            send_generations(generations, entries);
            update(shards, batch, entries).await
        }
        Err(e) => {
            tracing::error!(batches = ?batch_ids, "{call} failed: {e}");
            for id in batch_ids {
                let _ = shards.clear_cache(Some(id)).await;
            }
            fail_all(entries, &e);
            None
        }
    }
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
/// (their blocks are freed as the entry drops).
fn send_generations(generations: Vec<pb::Generation>, entries: &mut Entries) {
    for g in generations {
        let Some(entry) = entries.get_mut(&g.request_id) else { continue };
        if let Some(err) = g.error {
            // This request alone failed; the rest of the batch goes on.
            let code = pb::ErrorCode::try_from(err.code).unwrap_or(pb::ErrorCode::Internal);
            let e = ClientError::Shard { code, message: err.message, request_ids: err.request_ids };
            let mut failed: Entries = entries.remove_entry(&g.request_id).into_iter().collect();
            fail_all(&mut failed, &e);
            continue;
        }
        let tokens = g.tokens.unwrap_or_default();
        let (Some(&id), Some(&logprob)) = (tokens.ids.first(), tokens.logprobs.first()) else {
            let e = ClientError::Shard { code: pb::ErrorCode::Internal, message: "generation without a token".into(), request_ids: vec![] };
            let mut failed: Entries = entries.remove_entry(&g.request_id).into_iter().collect();
            fail_all(&mut failed, &e);
            continue;
        };
        let finish = match pb::FinishReason::try_from(g.finish_reason) {
            Ok(pb::FinishReason::Unspecified) | Err(_) => None,
            Ok(f) => Some(f),
        };
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

fn fail_all(entries: &mut Entries, e: &ClientError) {
    for (_, entry) in entries.drain() {
        let _ = entry.events.send(Err(InferError::from(e)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_allocator::BlockAllocator;
    use crate::error::ErrorKind;
    use crate::queue::tests::entry;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A fake shard: each request generates token ids input_len, input_len+1, ... and stops at max_new_tokens.
    #[derive(Default)]
    struct FakeState {
        batches: HashMap<u64, Vec<(u64, u32, u32, u32)>>, // id -> (request id, next token, generated, max_new)
        fail_prefill: bool,
        reject_input_len: Option<u32>, // requests with this prompt length fail alone
        steps: Vec<Vec<u64>>, // request ids of each decode step
        prefills: Vec<(u64, u32, Vec<u32>)>, // (request id, cached_tokens, blocks) of each prefilled request
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
        async fn prefill(&mut self, batch: pb::Batch, _trace: Option<String>) -> client::Result<pb::PrefillResponse> {
            let mut s = self.0.lock().unwrap();
            if s.fail_prefill {
                return Err(ClientError::Shard { code: pb::ErrorCode::OutOfMemory, message: "boom".into(), request_ids: vec![] });
            }
            let reject = s.reject_input_len;
            s.prefills.extend(batch.requests.iter().map(|r| (r.id, r.cached_tokens, r.blocks.clone())));
            let (bad, good): (Vec<_>, Vec<_>) = batch.requests.iter().partition(|r| Some(r.input_ids.len() as u32) == reject);
            for r in &good {
                s.caps.insert(r.id, r.blocks.len() as u32 * 16);
                if r.generated_tokens > 0 {
                    s.resumed.push((r.id, r.generated_tokens));
                }
            }
            let mut rows: Vec<_> = good.iter().map(|r| (r.id, r.input_ids.len() as u32, r.generated_tokens, r.stopping_parameters.as_ref().unwrap().max_new_tokens)).collect();
            let mut generations = gens(&mut rows);
            generations.extend(bad.iter().map(|r| pb::Generation {
                request_id: r.id,
                error: Some(pb::ShardError { code: pb::ErrorCode::InvalidRequest as i32, message: "bad".into(), request_ids: vec![r.id] }),
                ..Default::default()
            }));
            let c = cached(batch.id, &rows);
            s.batches.insert(batch.id, rows);
            Ok(pb::PrefillResponse { generations, batch: c, ..Default::default() })
        }
        async fn decode(&mut self, batches: Vec<pb::CachedBatch>, grants: Vec<pb::BlockGrant>, _trace: Option<String>) -> client::Result<pb::DecodeResponse> {
            tokio::time::sleep(Duration::from_micros(500)).await; // a step takes time, as on a real shard
            let mut s = self.0.lock().unwrap();
            for g in grants {
                *s.caps.get_mut(&g.request_id).expect("blocks granted to an unknown request") += 16 * g.blocks.len() as u32;
            }
            let mut rows = vec![];
            for b in &batches {
                rows.extend(s.batches.remove(&b.id).expect("decode of an unknown batch"));
            }
            // This step feeds the last token (position next - 1); a shard running ahead also
            // feeds the one it samples (position next) unless that is the last.
            for &(id, next, generated, max_new) in &rows {
                let last_fed = next - generated + max_new - 2;
                if generated < max_new && s.caps[&id] < (next + 1).min(last_fed + 1) {
                    s.kv_overruns.push(id);
                }
            }
            s.steps.push(rows.iter().map(|r| r.0).collect());
            let generations = gens(&mut rows);
            let c = cached(batches[0].id, &rows);
            s.batches.insert(batches[0].id, rows);
            Ok(pb::DecodeResponse { generations, batch: c, ..Default::default() })
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

    fn start(fake: Fake, blocks: u32) -> (Queue, BlockAllocator) {
        let alloc = BlockAllocator::new(blocks, 16);
        let queue = Queue::new(alloc.clone());
        let cfg = SchedulerConfig { max_batch_prefill_tokens: 1000, max_batch_size: None };
        tokio::spawn(batching_loop(fake, queue.clone(), cfg));
        (queue, alloc)
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
        assert_eq!(alloc.stats().await.free, 64);
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
        let stats = alloc.stats().await;
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
        drop(s);
        assert_eq!(alloc.stats().await.free, 12);
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
        assert!(steps.iter().any(|s| s.len() == 2), "both requests decoded in one step");
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
        assert_eq!(alloc.stats().await.free, 64);
        let steps = fake.0.lock().unwrap().steps.clone();
        assert!(steps.last().unwrap().len() == 1);
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
        assert_eq!(alloc.stats().await.free, 64);
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
        assert_eq!(alloc.stats().await.free, 64);
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
        assert_eq!(alloc.stats().await.free, 2);
    }
}
