//! The inference front: validate, enqueue, and turn the loop's token events into a response
//! stream (detokenization and stop sequences happen here, per request, off the GPU loop).

pub mod chat;
pub mod detokenize;
pub mod validation;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::engine::adapters::{AdapterLease, Adapters};
use crate::api::{FinishReason, GenerateRequest, PrefillToken, Token};
use crate::infer::detokenize::{Detokenizer, StopMatcher};
use crate::error::InferError;
use crate::metrics as m;
use crate::shard::pb;
use crate::engine::queue::{Entry, QueueHandle, ShardEvent};
use crate::infer::validation::{ValidGenerateRequest, Validation};

/// One event of a response stream.
#[derive(Debug, Clone)]
pub enum InferStreamEvent {
    Token { token: Token, top_tokens: Vec<Token> },
    End { token: Token, top_tokens: Vec<Token>, generated_text: String, details: EndDetails },
}

#[derive(Debug, Clone)]
pub struct EndDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    pub top_tokens: Vec<Vec<Token>>,
    /// Where a stop sequence starts in the generated text (OpenAI routes cut there).
    pub stop_at: Option<usize>,
    pub queued: Instant,
    pub started: Instant,
    pub finished: Instant,
}

impl EndDetails {
    pub fn logprob_sum(&self) -> f32 {
        self.tokens.iter().map(|t| t.logprob).sum()
    }
}

/// A whole response, for non-streaming routes.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub generated_text: String,
    pub details: EndDetails,
}

pub type ResponseStream = std::pin::Pin<Box<dyn Stream<Item = Result<InferStreamEvent, InferError>> + Send>>;

#[derive(Clone)]
pub struct Infer {
    validation: Validation,
    queue: QueueHandle,
    limit: Arc<Semaphore>,
    tokenizer: Arc<Tokenizer>,
    special: Arc<HashSet<u32>>,
    adapters: Adapters,
    /// Set at the end of a drain: every response still streaming ends with `ShuttingDown`.
    cut_off: Arc<watch::Sender<bool>>,
    /// One INFO line per finished request (`--disable-request-logging` turns it off).
    request_log: bool,
    /// Prompts share KV blocks through the allocator's prefix cache (`--prefix-caching`).
    prefix_caching: bool,
    next_id: Arc<AtomicU64>,
}

impl Infer {
    pub fn new(validation: Validation, queue: QueueHandle, tokenizer: Arc<Tokenizer>, max_concurrent: usize, adapters: Adapters) -> Self {
        let special = tokenizer.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let limit = Arc::new(Semaphore::new(max_concurrent));
        let cut_off = Arc::new(watch::channel(false).0);
        Self { validation, queue, limit, tokenizer, special: Arc::new(special), adapters, cut_off, request_log: true, prefix_caching: false,
               next_id: Arc::new(AtomicU64::new(0)) }
    }

    /// Whether each finished request is logged.
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    pub fn with_request_log(mut self, on: bool) -> Self {
        self.request_log = on;
        self
    }

    /// Ends every response still in flight with a `ShuttingDown` error (the drain ran out of time).
    pub fn cut_off(&self) {
        self.cut_off.send_replace(true);
    }

    pub fn adapters(&self) -> &Adapters {
        &self.adapters
    }

    /// The request's adapter made resident and held until its response ends (None: base model).
    async fn lease(&self, valid: &ValidGenerateRequest) -> Result<Option<Arc<AdapterLease>>, InferError> {
        let Some(name) = valid.adapter_id.as_deref() else { return Ok(None) };
        match self.adapters.acquire(name).await {
            Ok(lease) => Ok(Some(lease)),
            Err(e) => {
                // Label values come from a bounded set: a name no shard knows is `_unknown`.
                let known = !matches!(e, InferError::Shard { code: pb::ErrorCode::AdapterNotFound, .. });
                m::RequestTimer::new(Some(if known { name } else { m::UNKNOWN_ADAPTER })).failed(e.error_type_name());
                Err(e)
            }
        }
    }

    pub fn queue(&self) -> &QueueHandle {
        &self.queue
    }
    pub fn validation(&self) -> &Validation {
        &self.validation
    }
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }
    /// Requests in flight (admitted by the concurrency limit, not yet answered).
    pub fn in_flight(&self, max: usize) -> usize {
        max - self.limit.available_permits()
    }

    /// Validates and enqueues; the stream holds the concurrency permit until it ends.
    pub async fn generate_stream(&self, req: GenerateRequest) -> Result<(Arc<ValidGenerateRequest>, ResponseStream), InferError> {
        let arrived = Instant::now();
        let permit = self.permit()?;
        let valid = self.validation.validate(req).await?;
        let lease = self.lease(&valid).await?;
        Ok(self.enqueue(valid, permit, lease, arrived))
    }

    /// A permit under `--max-concurrent-requests`, held by whatever costs CPU on the request's
    /// behalf (tokenizing included); `Overloaded` when none is free.
    pub fn permit(&self) -> Result<OwnedSemaphorePermit, InferError> {
        self.limit.clone().try_acquire_owned().map_err(|_| InferError::Overloaded)
    }

    /// `arrived`: when the request came in (queue time and TTFT include validation and waiting
    /// for the adapter to load).
    fn enqueue(&self, valid: ValidGenerateRequest, permit: OwnedSemaphorePermit, lease: Option<Arc<AdapterLease>>,
               arrived: Instant) -> (Arc<ValidGenerateRequest>, ResponseStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut entry = Entry::new(valid, tx);
        entry.queued = arrived;
        // Base requests share with each other; an adapter's only within the same load of it.
        entry.prefix = self.prefix_caching.then(|| Arc::from(lease.as_ref().map(|l| l.cache_key()).unwrap_or_default()));
        let request = entry.request.clone();
        let span = crate::telemetry::RequestSpan::start(request.input_length(), request.stopping.max_new_tokens);
        entry.span = span.as_ref().map(|s| s.span_context());
        m::request_started(request.input_length());
        self.queue.append(entry);
        let ctx = StreamContext {
            tokenizer: self.tokenizer.clone(),
            special: self.special.clone(),
            cut_off: self.cut_off.subscribe(),
            log_id: self.request_log.then(|| self.next_id.fetch_add(1, Ordering::Relaxed)),
            arrived,
            permit,
            span,
            lease,
        };
        let stream = response_stream(rx, request.clone(), ctx);
        (request, Box::pin(stream))
    }

    /// One whole response; with `best_of` > 1, the most likely of that many sequences, the
    /// others in `best_of_sequences`.
    pub async fn generate(&self, req: GenerateRequest) -> Result<(InferResponse, Vec<InferResponse>), InferError> {
        let mut all = self.generate_n(req, None).await?;
        if all.len() == 1 {
            return Ok((all.remove(0), vec![]));
        }
        let best = all
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.details.logprob_sum().total_cmp(&b.1.details.logprob_sum()))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let best = all.remove(best);
        Ok((best, all))
    }

    /// `n` independent sequences for one prompt (`n` = None: the request's `best_of`), each with
    /// its own seed, generated concurrently in the same batches.
    pub async fn generate_n(&self, req: GenerateRequest, n: Option<u32>) -> Result<Vec<InferResponse>, InferError> {
        let streams = self.generate_streams(req, n).await?;
        let all = futures::future::join_all(streams.into_iter().map(|(_, s)| collect(s))).await;
        all.into_iter().collect()
    }

    /// Like `generate_n`, as streams.
    pub async fn generate_streams(&self, req: GenerateRequest, n: Option<u32>) -> Result<Vec<(Arc<ValidGenerateRequest>, ResponseStream)>, InferError> {
        let arrived = Instant::now();
        // The first permit before tokenizing: over the limit, a request costs no CPU.
        let mut permits = vec![self.permit()?];
        let valid = self.validation.validate(req).await?;
        // `best_of` was checked by validation; OpenAI's `n` may repeat a greedy request.
        let n = n.unwrap_or(valid.best_of).max(1);
        for _ in 1..n {
            permits.push(self.permit()?);
        }
        let lease = self.lease(&valid).await?;
        let base_seed = valid.parameters.seed;
        Ok(permits
            .into_iter()
            .enumerate()
            .map(|(i, permit)| {
                let mut v = valid.clone();
                v.parameters.seed = base_seed.wrapping_add(i as u64);
                self.enqueue(v, permit, lease.clone(), arrived)
            })
            .collect())
    }
}

async fn collect(mut stream: ResponseStream) -> Result<InferResponse, InferError> {
    while let Some(ev) = stream.next().await {
        if let InferStreamEvent::End { generated_text, details, .. } = ev? {
            return Ok(InferResponse { generated_text, details });
        }
    }
    Err(InferError::Dropped)
}

/// Decodes ids one by one (for top tokens and prompt tokens).
fn token_texts(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| tokenizer.decode(&[id], false).unwrap_or_default()).collect()
}

/// What a response stream needs besides its request, and what it holds until it ends.
struct StreamContext {
    tokenizer: Arc<Tokenizer>,
    special: Arc<HashSet<u32>>,
    cut_off: watch::Receiver<bool>,
    /// The request's number in the request log; None: not logged.
    log_id: Option<u64>,
    arrived: Instant,
    permit: OwnedSemaphorePermit,
    span: Option<crate::telemetry::RequestSpan>,
    lease: Option<Arc<AdapterLease>>,
}

/// The request log line (target `tessera::request`), one per request that entered the queue:
/// written when its response ends, or as `cancelled` when the client went away first.
struct RequestLog {
    id: Option<u64>,
    request: Arc<ValidGenerateRequest>,
    arrived: Instant,
    first: Option<Instant>,
    queued_for: Option<std::time::Duration>,
    generated: u32,
    written: bool,
}

impl RequestLog {
    fn token(&mut self, queued: Instant, started: Instant) {
        self.first.get_or_insert_with(Instant::now);
        self.queued_for.get_or_insert(started.duration_since(queued));
        self.generated += 1;
    }

    fn finish(&mut self, outcome: &str) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let Some(id) = self.id else { return };
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let r = &self.request;
        tracing::info!(
            target: "tessera::request",
            id,
            adapter = r.adapter_id.as_deref().unwrap_or("-"),
            input_tokens = r.input_length(),
            output_tokens = self.generated,
            max_new_tokens = r.stopping.max_new_tokens,
            sampling = r.parameters.do_sample,
            queue_ms = self.queued_for.map(ms),
            ttft_ms = self.first.map(|t| ms(t.duration_since(self.arrived))),
            total_ms = ms(self.arrived.elapsed()),
            outcome,
            "request done"
        );
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

fn response_stream(
    mut rx: mpsc::UnboundedReceiver<Result<ShardEvent, InferError>>,
    request: Arc<ValidGenerateRequest>,
    ctx: StreamContext,
) -> impl Stream<Item = Result<InferStreamEvent, InferError>> + Send + 'static {
    let StreamContext { tokenizer, special, mut cut_off, log_id, arrived, permit, span, lease } = ctx;
    async_stream::stream! {
        let (_permit, _lease) = (permit, lease);
        let mut timer = m::RequestTimer::new(request.adapter_id.as_deref());
        let mut detok = Detokenizer::new(tokenizer.clone(), &request.input_ids);
        let mut matcher = StopMatcher::new(request.stopping.stop_sequences.clone());
        let mut tokens: Vec<Token> = Vec::new();
        let mut top_tokens: Vec<Vec<Token>> = Vec::new();
        let mut prefill_tokens: Vec<PrefillToken> = Vec::new();
        let mut log = RequestLog { id: log_id, request: request.clone(), arrived, first: None, queued_for: None, generated: 0, written: false };
        loop {
            let event = tokio::select! {
                biased;
                e = rx.recv() => e,
                _ = cut_off.wait_for(|c| *c) => Some(Err(InferError::ShuttingDown)),
            };
            let Some(event) = event else { break };
            let ShardEvent::Token { id, logprob, finish, seed, top, prefill, cached, queued, started } = match event {
                Ok(e) => e,
                Err(e) => {
                    m::request_failed(e.error_type_name());
                    timer.failed(e.error_type_name());
                    if let Some(s) = &span { s.finish(tokens.len() as u32, e.error_type_name()); }
                    log.finish(e.error_type_name());
                    yield Err(e);
                    return;
                }
            };
            log.token(queued, started);
            timer.token(queued, started);
            if let Some(p) = prefill {
                let texts = token_texts(&tokenizer, &p.ids);
                prefill_tokens = p.ids.iter().zip(p.logprobs.iter()).zip(texts)
                    .map(|((&id, &lp), text)| PrefillToken { id, text, logprob: (!lp.is_nan()).then_some(lp) })
                    .collect();
            }
            let top: Vec<Token> = top.map(|t| {
                let texts = token_texts(&tokenizer, &t.ids);
                t.ids.iter().zip(t.logprobs.iter()).zip(texts)
                    .map(|((&id, &logprob), text)| Token { id, text, logprob, special: special.contains(&id) })
                    .collect()
            }).unwrap_or_default();
            let text = detok.push(id);
            let stopped = matcher.push(&text);
            let token = Token { id, text, logprob, special: special.contains(&id) };
            tokens.push(token.clone());
            if request.top_n_tokens > 0 {
                top_tokens.push(top.clone());
            }
            let reason = match finish {
                Some(pb::FinishReason::EosToken) => Some(FinishReason::EosToken),
                _ if stopped => Some(FinishReason::StopSequence),
                Some(_) => Some(FinishReason::Length),
                None => None,
            };
            let Some(finish_reason) = reason else {
                yield Ok(InferStreamEvent::Token { token, top_tokens: top });
                continue;
            };
            let mut generated_text = detok.generated_text();
            let stop_at = if stopped { matcher.sequences().find(&generated_text) } else { None };
            if request.return_full_text {
                generated_text = format!("{}{}", request.inputs, generated_text);
            }
            let details = EndDetails {
                finish_reason,
                generated_tokens: tokens.len() as u32,
                seed: request.report_seed.then_some(seed),
                input_length: request.input_length(),
                cached_tokens: cached,
                prefill: std::mem::take(&mut prefill_tokens),
                tokens: std::mem::take(&mut tokens),
                top_tokens: std::mem::take(&mut top_tokens),
                stop_at,
                queued,
                started,
                finished: Instant::now(),
            };
            timer.finish(details.queued, details.started, details.finished, details.generated_tokens);
            if let Some(s) = &span { s.finish(details.generated_tokens, "success"); }
            let outcome = match finish_reason {
                FinishReason::Length => "length",
                FinishReason::EosToken => "eos_token",
                FinishReason::StopSequence => "stop_sequence",
            };
            log.finish(outcome);
            yield Ok(InferStreamEvent::End { token, top_tokens: top, generated_text, details });
            return; // dropping `rx` tells the loop to filter this request out
        }
        m::request_failed("dropped");
        timer.failed("dropped");
        log.finish("dropped");
        yield Err(InferError::Dropped);
    }
}
