//! Prometheus metrics, all named `tessera_*`. Recording is cheap (atomics); `/metrics` renders.
//! Callers pass plain values: this module depends on no other part of the router.

use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};


/// Installs the global recorder; returns the handle `/metrics` renders from.
pub fn install() -> Result<PrometheusHandle, String> {
    let seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
    let tokens = [1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), &tokens))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("tessera_requests_total", "Requests answered, by status (success or error type)");
    describe_gauge!("tessera_queue_size", "Requests waiting to be admitted");
    describe_gauge!("tessera_batch_size", "Requests in the running batch");
    describe_gauge!("tessera_kv_blocks_free", "KV cache blocks an admission can take (unused, or cached and idle)");
    describe_gauge!("tessera_kv_blocks_cached", "Of the free blocks, those holding a cached prefix");
    describe_gauge!("tessera_kv_blocks_total", "KV cache blocks");
    describe_counter!("tessera_prefix_cache_queries_total", "Prompts looked up in the prefix cache");
    describe_counter!("tessera_prefix_cache_hits_total", "Prompts that found a cached prefix");
    describe_counter!("tessera_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache");
    describe_counter!("tessera_prefix_cache_hit_tokens_total", "Prompt tokens found cached (not computed)");
    describe_counter!("tessera_prefix_cache_evictions_total", "Cached blocks reused for other contents");
    describe_histogram!("tessera_batch_step_tokens", "Tokens computed per step: a token per decoding row plus prompt chunks");
    describe_histogram!("tessera_batch_prefill_tokens", "Prompt tokens computed per step with prompts (cached prefixes excluded)");
    describe_histogram!("tessera_batch_prefill_requests", "Prompts (whole or a chunk) per step with prompts");
    describe_counter!("tessera_prefill_chunks_total", "Prompt chunks sent that were not their prompt's last (the token budget split the prompt)");
    describe_counter!("tessera_chunked_prefills_total", "Prompts computed over more than one step");
    describe_counter!("tessera_preemptions_total", "Running requests paused to free KV blocks for older ones (recomputed later)");
    describe_histogram!("tessera_request_duration_seconds", Unit::Seconds, "Whole request, queue included");
    describe_histogram!("tessera_request_queue_duration_seconds", Unit::Seconds, "Time waiting in the queue");
    describe_histogram!("tessera_request_inference_duration_seconds", Unit::Seconds, "Admission to last token");
    describe_histogram!("tessera_time_to_first_token_seconds", Unit::Seconds, "Arrival to first token");
    describe_histogram!("tessera_inter_token_latency_seconds", Unit::Seconds, "Between consecutive tokens");
    describe_histogram!("tessera_batch_prefill_duration_seconds", Unit::Seconds, "One step with prompts (and decoding rows) in it");
    describe_histogram!("tessera_batch_decode_duration_seconds", Unit::Seconds, "One step of decoding rows only");
    describe_histogram!("tessera_batch_router_duration_seconds", Unit::Seconds,
                        "Router time between a step's answer and the next step call (steps without prompts)");
    describe_histogram!("tessera_grammar_compile_seconds", Unit::Seconds, "Compiling a request's grammar (cache misses only)");
    describe_counter!("tessera_grammar_cache_total", "Grammar lookups, by result (hit: compiled before, miss: compiled now)");
    describe_histogram!("tessera_grammar_mask_seconds", Unit::Seconds, "Computing the token masks of one step's constrained rows");
    describe_histogram!("tessera_request_input_tokens", "Prompt tokens per request");
    describe_histogram!("tessera_request_generated_tokens", "Generated tokens per request");
    describe_counter!("tessera_input_tokens_total", "Prompt tokens of all requests");
    describe_counter!("tessera_generated_tokens_total", "Generated tokens of all requests");
    describe_counter!("tessera_adapter_requests_total", "Requests answered per adapter (`_base`: no adapter), by status");
    describe_counter!("tessera_adapter_generated_tokens_total", "Generated tokens per adapter");
    describe_histogram!("tessera_adapter_request_duration_seconds", Unit::Seconds, "Whole request per adapter");
    describe_histogram!("tessera_adapter_time_to_first_token_seconds", Unit::Seconds, "Arrival to first token per adapter");
    describe_counter!("tessera_adapter_loads_total", "Adapters made resident on the shards");
    describe_counter!("tessera_adapter_load_failures_total", "Adapter loads that failed");
    describe_counter!("tessera_adapter_evictions_total", "Adapters unloaded to make room");
    describe_histogram!("tessera_adapter_load_duration_seconds", Unit::Seconds, "One adapter load (disk to device, all shards)");
    describe_gauge!("tessera_adapters_resident", "Adapters resident on the shards");
}

/// The `adapter` label of requests naming an adapter no shard knows (client-chosen names never
/// become label values).
pub const UNKNOWN_ADAPTER: &str = "_unknown";

/// The `adapter` label of per-adapter metrics: the adapter's name, or `_base` (no adapter name
/// can start with `_`).
pub fn adapter_label(adapter: Option<&str>) -> String {
    adapter.unwrap_or("_base").to_string()
}

/// A request entered the queue with `input_tokens` prompt tokens.
pub fn request_started(input_tokens: u32) {
    histogram!("tessera_request_input_tokens").record(input_tokens as f64);
    counter!("tessera_input_tokens_total").increment(input_tokens as u64);
}

pub fn request_failed(error_type: &str) {
    counter!("tessera_requests_total", "status" => error_type.to_string()).increment(1);
}

pub fn queue_size(n: usize) {
    gauge!("tessera_queue_size").set(n as f64);
}

pub fn batch_size(n: usize) {
    gauge!("tessera_batch_size").set(n as f64);
}

pub fn kv_blocks(free: u32, cached: u32, total: u32) {
    gauge!("tessera_kv_blocks_free").set(free as f64);
    gauge!("tessera_kv_blocks_cached").set(cached as f64);
    gauge!("tessera_kv_blocks_total").set(total as f64);
}

/// One prompt looked up in the prefix cache: its tokens, and how many leading ones were cached.
pub fn prefix_lookup(queried: u32, hit: u32) {
    counter!("tessera_prefix_cache_queries_total").increment(1);
    counter!("tessera_prefix_cache_queried_tokens_total").increment(queried as u64);
    counter!("tessera_prefix_cache_hit_tokens_total").increment(hit as u64);
    if hit > 0 {
        counter!("tessera_prefix_cache_hits_total").increment(1);
    }
}

/// One step: its decoding rows, and the prompt tokens it computes (past cached prefixes) for
/// `prompts` prompts, `partial` of them chunks that are not their prompt's last and `completed`
/// prompts whose last chunk it is after earlier ones.
pub fn step(decoding: usize, prompt_tokens: u32, prompts: usize, partial: usize, completed: usize) {
    histogram!("tessera_batch_step_tokens").record((decoding as u32 + prompt_tokens) as f64);
    if prompts > 0 {
        histogram!("tessera_batch_prefill_tokens").record(prompt_tokens as f64);
        histogram!("tessera_batch_prefill_requests").record(prompts as f64);
    }
    counter!("tessera_prefill_chunks_total").increment(partial as u64);
    counter!("tessera_chunked_prefills_total").increment(completed as u64);
}

pub fn grammar_lookup(hit: bool, compile: Option<Duration>) {
    counter!("tessera_grammar_cache_total", "result" => if hit { "hit" } else { "miss" }).increment(1);
    if let Some(d) = compile {
        histogram!("tessera_grammar_compile_seconds").record(d.as_secs_f64());
    }
}

pub fn grammar_masks(d: Duration) {
    histogram!("tessera_grammar_mask_seconds").record(d.as_secs_f64());
}

pub fn preemption() {
    counter!("tessera_preemptions_total").increment(1);
}

pub fn prefix_eviction() {
    counter!("tessera_prefix_cache_evictions_total").increment(1);
}

pub fn prefill_duration(d: Duration) {
    histogram!("tessera_batch_prefill_duration_seconds").record(d.as_secs_f64());
}

pub fn router_step_duration(d: Duration) {
    histogram!("tessera_batch_router_duration_seconds").record(d.as_secs_f64());
}

pub fn decode_duration(d: Duration) {
    histogram!("tessera_batch_decode_duration_seconds").record(d.as_secs_f64());
}

/// Per-request token timing, overall and per adapter.
pub struct RequestTimer {
    last: Option<Instant>,
    adapter: String,
    adapter_tokens: metrics::Counter,
}

impl RequestTimer {
    pub fn new(adapter: Option<&str>) -> Self {
        let adapter = adapter_label(adapter);
        let adapter_tokens = counter!("tessera_adapter_generated_tokens_total", "adapter" => adapter.clone());
        Self { last: None, adapter, adapter_tokens }
    }

    pub fn token(&mut self, queued: Instant, _started: Instant) {
        let now = Instant::now();
        match self.last {
            None => {
                let ttft = now.duration_since(queued).as_secs_f64();
                histogram!("tessera_time_to_first_token_seconds").record(ttft);
                histogram!("tessera_adapter_time_to_first_token_seconds", "adapter" => self.adapter.clone()).record(ttft);
            }
            Some(prev) => histogram!("tessera_inter_token_latency_seconds").record(now.duration_since(prev).as_secs_f64()),
        }
        self.last = Some(now);
        counter!("tessera_generated_tokens_total").increment(1);
        self.adapter_tokens.increment(1);
    }

    pub fn failed(&self, error_type: &str) {
        counter!("tessera_adapter_requests_total", "adapter" => self.adapter.clone(), "status" => error_type.to_string()).increment(1);
    }

    /// The request succeeded: it was queued, admitted (`started`) and `finished` at these
    /// times, with `generated_tokens` tokens.
    pub fn finish(&self, queued: Instant, started: Instant, finished: Instant, generated_tokens: u32) {
        histogram!("tessera_request_duration_seconds").record(finished.duration_since(queued).as_secs_f64());
        histogram!("tessera_request_queue_duration_seconds").record(started.duration_since(queued).as_secs_f64());
        histogram!("tessera_request_inference_duration_seconds").record(finished.duration_since(started).as_secs_f64());
        histogram!("tessera_request_generated_tokens").record(generated_tokens as f64);
        counter!("tessera_requests_total", "status" => "success").increment(1);
        let total = finished.duration_since(queued).as_secs_f64();
        histogram!("tessera_adapter_request_duration_seconds", "adapter" => self.adapter.clone()).record(total);
        counter!("tessera_adapter_requests_total", "adapter" => self.adapter.clone(), "status" => "success").increment(1);
    }
}
