//! The `text-generation-router` program: connects to the shards, warms them up, serves HTTP.
//! Its binary is declared in the launcher's package (`launcher/src/bin/`), so that one crate
//! ships both programs (the pip wheel is built from it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::http::accept::{self, AcceptConfig};
use crate::engine::adapters::Adapters;
use crate::api::Info;
use crate::args::{LimitArgs, ServiceArgs};
use crate::infer::chat::ChatTemplate;
use crate::engine::kv::BlockAllocator;
use crate::shard::client::ShardedClient;
use crate::http::health::ShardHealth;
use crate::infer::Infer;
use crate::shard::pb;
use crate::engine::queue::Queue;
use crate::engine::scheduler::{batching_loop, SchedulerConfig};
use crate::http::server::app;
use crate::http::AppState;
use crate::engine::grammar::Grammars;
use crate::infer::validation::Validation;

#[derive(Parser, Debug)]
#[command(name = "text-generation-router", version, about = "Tessera HTTP router")]
pub struct Args {
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    service: ServiceArgs,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value_t = 60)]
    shutdown_timeout: u64,
    /// Address to listen on.
    #[arg(long, env = "HOSTNAME", default_value = "0.0.0.0")]
    hostname: String,
    /// Port to listen on.
    #[arg(long, short, env = "PORT", default_value_t = 3000)]
    port: u16,
    /// Unix socket of shard 0; the others are discovered from it.
    #[arg(long, env = "MASTER_SHARD_UDS_PATH", default_value = "/tmp/tessera-server-0")]
    master_shard_uds_path: String,
    /// Model directory holding tokenizer.json.
    #[arg(long, env = "TOKENIZER_DIR")]
    tokenizer_dir: PathBuf,
    /// Model name reported by /info.
    #[arg(long, env = "MODEL_ID", default_value = "default")]
    model_id: String,
    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    json_output: bool,
    /// The launch's token (set by the launcher): every shard must report it in Info, so that a
    /// shard of another instance on the same socket path is refused.
    #[arg(long, env = "TESSERA_LAUNCH_TOKEN", hide = true, hide_env_values = true)]
    launch_token: Option<String>,
}

/// The largest step the router will ever send, as dummy prompts.
fn warmup_batch(limits: &LimitArgs, block_size: u32) -> pb::Batch {
    let mut requests = vec![];
    let mut left = limits.largest_step();
    let mut next_block = 0u32;
    while left > 0 {
        let n = left.min(limits.max_input_tokens);
        let blocks: Vec<u32> = (next_block..next_block + (n + 1).div_ceil(block_size)).collect();
        next_block += blocks.len() as u32;
        let cache_locs = (0..n).map(|p| blocks[(p / block_size) as usize] * block_size + p % block_size).collect();
        requests.push(pb::Request {
            id: requests.len() as u64,
            input_ids: vec![0; n as usize],
            parameters: Some(pb::NextTokenChooserParameters { temperature: 1.0, top_p: 1.0, typical_p: 1.0, repetition_penalty: 1.0, ..Default::default() }),
            stopping_parameters: Some(pb::StoppingCriteriaParameters { max_new_tokens: 1, ignore_eos_token: true }),
            blocks,
            cache_locs,
            ..Default::default()
        });
        left -= n;
    }
    pb::Batch { id: u64::MAX, size: requests.len() as u32, max_tokens: limits.largest_step(), max_blocks: 0, requests }
}

async fn connect(path: &str) -> Result<ShardedClient, String> {
    let mut last = String::new();
    for _ in 0..600 {
        match ShardedClient::connect_uds(path).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("could not connect to shard at {path}: {last}"))
}

/// The program: parses the command line, serves until SIGTERM/SIGINT, exits 1 on an error.
pub async fn main() {
    let args = Args::parse();
    crate::logging::init(args.json_output);
    if let Err(e) = run(args).await {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    args.limits.check()?;
    let tracing_provider = match &args.service.otlp_endpoint {
        Some(ep) => Some(crate::telemetry::init(ep, &args.service.otlp_service_name)?),
        None => None,
    };
    let tokenizer_path = args.tokenizer_dir.join("tokenizer.json");
    let tokenizer = Arc::new(
        tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| format!("loading {}: {e}", tokenizer_path.display()))?,
    );
    let mut client = connect(&args.master_shard_uds_path).await?;
    let infos = client.infos().await.map_err(|e| e.to_string())?;
    if let Some(token) = &args.launch_token {
        for (path, info) in &infos {
            if &info.launch_token != token {
                return Err(format!(
                    "the shard at {path} was not started by this launch (another Tessera instance on the same \
                     --shard-uds-path?); refusing to use it"
                ));
            }
        }
    }
    for (rank, (path, info)) in infos.iter().enumerate() {
        if info.rank as usize != rank || info.world_size as usize != infos.len() {
            return Err(format!(
                "the shard at {path} is rank {} of {}, but it is shard {rank} of {} here",
                info.rank, info.world_size, infos.len()
            ));
        }
    }
    let mut shard_info = client.info().await.map_err(|e| e.to_string())?;
    shard_info.launch_token.clear(); // checked above; kept out of the log
    tracing::info!(shards = client.num_shards(), ?shard_info, "connected");
    let block_size = shard_info.block_size;
    let num_blocks = client
        .warmup(pb::WarmupRequest {
            batch: Some(warmup_batch(&args.limits, block_size)),
            max_input_tokens: args.limits.max_input_tokens,
            max_prefill_tokens: args.limits.max_batch_prefill_tokens,
            max_total_tokens: args.limits.max_total_tokens,
            num_blocks: args.limits.max_batch_total_tokens.map_or(0, |t| t.div_ceil(block_size)),
        })
        .await
        .map_err(|e| format!("warmup failed: {e}"))?;
    if num_blocks * block_size < args.limits.max_total_tokens {
        return Err(format!(
            "the KV cache holds {} tokens, less than --max-total-tokens {}",
            num_blocks * block_size,
            args.limits.max_total_tokens
        ));
    }
    tracing::info!(num_blocks, block_size, "warmup done");

    let allocator = BlockAllocator::new(num_blocks, block_size);
    let (queue, queue_handle) = Queue::new();
    let cfg = SchedulerConfig {
        max_batch_tokens: args.limits.step_tokens(),
        max_batch_prefill_tokens: args.limits.max_batch_prefill_tokens,
        max_batch_size: args.limits.max_batch_size,
    };
    tokio::spawn(batching_loop(client.clone(), queue, allocator.clone(), cfg));

    let info = Info {
        model_id: args.model_id.clone(),
        model_dtype: shard_info.dtype.clone(),
        model_device_type: shard_info.device_type.clone(),
        attention_backend: shard_info.attention_backend.clone(),
        max_concurrent_requests: args.limits.max_concurrent_requests,
        max_best_of: args.limits.max_best_of,
        max_stop_sequences: args.limits.max_stop_sequences,
        max_input_tokens: args.limits.max_input_tokens,
        max_total_tokens: args.limits.max_total_tokens,
        max_batch_prefill_tokens: args.limits.max_batch_prefill_tokens,
        max_batch_tokens: args.limits.step_tokens(),
        max_batch_total_tokens: num_blocks * block_size,
        max_top_n_tokens: args.limits.max_top_n_tokens,
        block_size,
        kv_blocks_total: num_blocks,
        kv_blocks_used: 0,
        kv_blocks_free: num_blocks,
        kv_blocks_cached: 0,
        queue_size: 0,
        max_active_adapters: shard_info.max_active_adapters,
        adapters: vec![],
        world_size: infos.len() as u32,
        shard_parameters: infos.iter().map(|(_, i)| i.num_parameters).collect(),
        router: env!("CARGO_PKG_NAME").into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let chat_template = ChatTemplate::load(&args.tokenizer_dir, args.service.chat_template.as_deref())?.map(Arc::new);
    if chat_template.is_none() {
        tracing::warn!("the model has no chat template: /v1/chat/completions will answer 422");
    }
    let metrics = match crate::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("metrics disabled: {e}");
            None
        }
    };
    let mut validation = Validation::new(tokenizer.clone(), args.limits.clone());
    let (vocab, eos) = (shard_info.vocab_size as usize, shard_info.eos_token_ids.clone());
    match tokio::task::spawn_blocking(move || Grammars::new(&tokenizer_path, vocab, &eos)).await {
        Ok(Ok(g)) => validation = validation.with_grammars(Arc::new(g)),
        Ok(Err(e)) => tracing::warn!("structured output is off (grammar, response_format answer 422): {e}"),
        Err(e) => tracing::warn!("structured output is off: {e}"),
    }
    let adapters = Adapters::new(Arc::new(client.clone()), shard_info.max_active_adapters as usize);
    let infer = Infer::new(validation, queue_handle, tokenizer, args.limits.max_concurrent_requests, adapters)
        .with_request_log(!args.service.disable_request_logging)
        .with_prefix_caching(args.limits.prefix_caching.is_on());
    let draining = Arc::new(AtomicBool::new(false));
    let health = ShardHealth::new(client.clone());
    health.spawn_monitor(Duration::from_secs(1));
    let state = AppState {
        infer: infer.clone(),
        allocator,
        health,
        info: Arc::new(info),
        chat_template,
        metrics,
        api_key: args.service.api_key.clone().map(Arc::new),
        payload_limit: args.limits.payload_limit,
        body_timeout: Duration::from_secs(args.service.http_body_timeout),
        draining: draining.clone(),
        cors_allow_origin: Arc::new(args.service.cors_allow_origin.clone()),
    };

    let addr = format!("{}:{}", args.hostname, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| format!("binding {addr}: {e}"))?;
    tracing::info!("listening on http://{addr}");
    let max = args.limits.max_concurrent_requests;
    let drain = Duration::from_secs(args.shutdown_timeout);
    let shutdown = async move {
        shutdown_signal().await;
        // New work gets 503 from here on; in-flight requests run to the end, or until the
        // timeout, when those left are ended with an error event / 503.
        draining.store(true, Ordering::SeqCst);
        let end = std::time::Instant::now() + drain;
        while infer.in_flight(max) > 0 && std::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = infer.in_flight(max);
        if left > 0 {
            tracing::warn!(left, "--shutdown-timeout reached: ending the requests still in flight");
            infer.cut_off();
        }
        tracing::info!("drained");
    };
    let cfg = AcceptConfig {
        header_timeout: Duration::from_secs(args.service.http_header_timeout),
        close_grace: Duration::from_secs(5),
    };
    accept::serve(listener, app(state), cfg, shutdown).await;
    if let Some(p) = tracing_provider {
        // Flushes the spans still batched (blocking HTTP: off the runtime).
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
    tracing::info!("exiting");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutdown requested: finishing in-flight requests");
}
