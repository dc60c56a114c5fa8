//! `text-generation-launcher`: the one command a user runs. Resolves the model, starts one
//! shard per GPU and the router, and supervises them: any child dying, or a shard that stops
//! answering for `--shard-watchdog-timeout`, stops the rest and exits non-zero; SIGTERM/SIGINT
//! drain the router, then stop the shards, and exit 0.

mod shard_log;
mod supervise;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use text_generation_router::args::{LimitArgs, ServiceArgs};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::supervise::{check_socket_free, die_with_us, spawn_error, wait_for_shard, watchdog, Children, Output};

#[derive(Parser, Debug)]
#[command(name = "text-generation-launcher", version, about = "Tessera: serve a language model over HTTP")]
struct Args {
    /// Model to serve: a local model directory (config.json + *.safetensors + tokenizer.json), or
    /// a hub repository id (org/name), downloaded once into the hub cache (HF_HOME, HF_TOKEN,
    /// HF_HUB_OFFLINE and HF_ENDPOINT apply). Unset: the embedded default, SmolLM2-135M-Instruct.
    #[arg(long, env = "MODEL_ID")]
    model_id: Option<String>,
    /// Hub revision of --model-id: a branch, tag or commit (default: main).
    #[arg(long, env = "REVISION")]
    revision: Option<String>,
    /// The hub cache folder (default: $HF_HOME/hub).
    #[arg(long, env = "HUGGINGFACE_HUB_CACHE")]
    huggingface_hub_cache: Option<PathBuf>,
    /// HTTP port.
    #[arg(long, short, env = "PORT", default_value_t = 3000)]
    port: u16,
    /// HTTP address to listen on. Its variable is TGI's HOSTNAME, which Docker and Kubernetes set
    /// to the container's name: the server then listens on the container's address.
    #[arg(long, env = "HOSTNAME", default_value = "0.0.0.0")]
    hostname: String,
    /// Number of shards: the model is split over them (tensor parallelism; one per GPU, or CPU
    /// processes). Default: 1, or every visible GPU with `--sharded true`.
    #[arg(long, env = "NUM_SHARD")]
    num_shard: Option<usize>,
    /// TGI's switch: `true` shards the model over --num-shard GPUs (default: every visible GPU),
    /// `false` runs one shard.
    #[arg(long, env = "SHARDED")]
    sharded: Option<bool>,
    /// Weights and activations dtype: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).
    #[arg(long, env = "DTYPE")]
    dtype: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    service: ServiceArgs,
    /// LoRA adapters known at start: name=path,... (PEFT directories).
    #[arg(long, env = "LORA_ADAPTERS", default_value = "")]
    lora_adapters: String,
    /// Directory of adapters loadable by name on first use (names resolve inside it only).
    #[arg(long, env = "ADAPTER_SOURCE")]
    adapter_source: Option<PathBuf>,
    /// Adapters kept resident on each shard at once (least recently used evicted).
    #[arg(long, env = "MAX_ACTIVE_ADAPTERS", default_value_t = 8)]
    max_active_adapters: usize,
    /// Largest LoRA rank on CUDA: each resident adapter takes a slot padded to this rank.
    #[arg(long, env = "MAX_LORA_RANK", default_value_t = 64)]
    max_lora_rank: usize,
    /// Decode batch sizes captured as CUDA graphs at warmup (comma-separated; 0 disables).
    #[arg(long, env = "CUDA_GRAPHS", default_value = "1,2,4,8,16,32,48,64,96,128,160,192,224,256,320,384,448,512")]
    cuda_graphs: String,
    /// Share of free GPU memory the KV cache may take after warmup.
    #[arg(long, env = "CUDA_MEMORY_FRACTION", default_value_t = 0.9)]
    cuda_memory_fraction: f32,
    /// Unix socket path prefix of the shards (each appends -RANK).
    #[arg(long, env = "SHARD_UDS_PATH", default_value = "/tmp/tessera-server")]
    shard_uds_path: String,
    /// Shard executable.
    #[arg(long, env = "SERVER_BIN", default_value = "text-generation-server")]
    server_bin: String,
    /// Router executable (default: next to this launcher, else on PATH).
    #[arg(long, env = "ROUTER_BIN")]
    router_bin: Option<PathBuf>,
    /// Seconds to wait for the shards to load and report healthy.
    #[arg(long, env = "SHARD_STARTUP_TIMEOUT", default_value_t = 600)]
    shard_startup_timeout: u64,
    /// Seconds in-flight requests get to finish on SIGTERM/SIGINT; those still running then end
    /// with an error.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value_t = 60)]
    shutdown_timeout: u64,
    /// Seconds a shard may go without answering a health check before the launcher stops
    /// everything and exits 1, so that an orchestrator restarts the server (0: never).
    #[arg(long, env = "SHARD_WATCHDOG_TIMEOUT", default_value_t = 60)]
    shard_watchdog_timeout: u64,
    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    json_output: bool,
    /// The model's name in /info, /v1/models and responses (default: --model-id).
    #[arg(long, env = "SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    #[command(flatten)]
    unsupported: Unsupported,
    #[command(flatten)]
    inert: Inert,
}

/// TGI's scheduler knobs with no counterpart here, which TGI deployments carry: accepted, with a
/// warning at start that says why they change nothing.
#[derive(clap::Args, Debug, Default)]
struct Inert {
    /// No effect: each step admits waiting prompts (chunked) within --max-batch-tokens, so no
    /// request waits for a number of decode steps.
    #[arg(long, env = "MAX_WAITING_TOKENS", hide_short_help = true)]
    max_waiting_tokens: Option<usize>,
    /// No effect, for the same reason as --max-waiting-tokens.
    #[arg(long, env = "WAITING_SERVED_RATIO", hide_short_help = true)]
    waiting_served_ratio: Option<f32>,
}

impl Inert {
    fn warnings(&self) -> Vec<String> {
        let why = "Tessera's scheduler admits waiting prompts at every step, within --max-batch-tokens";
        let mut out = vec![];
        if let Some(n) = self.max_waiting_tokens {
            out.push(format!("--max-waiting-tokens {n} has no effect: {why}"));
        }
        if let Some(r) = self.waiting_served_ratio {
            out.push(format!("--waiting-served-ratio {r} has no effect: {why}"));
        }
        out
    }
}

/// TGI's flags for features Tessera does not have yet: accepted by the parser so that a TGI
/// command line gets a clear refusal instead of "unexpected argument".
#[derive(clap::Args, Debug, Default)]
struct Unsupported {
    /// Not supported yet (weights are served in --dtype).
    #[arg(long, env = "QUANTIZE", hide_short_help = true)]
    quantize: Option<String>,
    /// Not supported yet (no speculative decoding).
    #[arg(long, env = "SPECULATE", hide_short_help = true)]
    speculate: Option<String>,
    /// Not supported yet (the KV cache is kept in --dtype).
    #[arg(long, env = "KV_CACHE_DTYPE", hide_short_help = true)]
    kv_cache_dtype: Option<String>,
    /// Not supported (no model code is ever loaded from a model repository).
    #[arg(long, env = "TRUST_REMOTE_CODE", hide_short_help = true)]
    trust_remote_code: bool,
}

impl Unsupported {
    /// Refuses the command line when it asks for any of these, naming each flag.
    fn check(&self) -> Result<(), String> {
        let mut asked = vec![];
        if let Some(q) = &self.quantize {
            asked.push(format!("--quantize {q} (quantized weights)"));
        }
        if let Some(s) = &self.speculate {
            asked.push(format!("--speculate {s} (speculative decoding)"));
        }
        if let Some(d) = &self.kv_cache_dtype {
            asked.push(format!("--kv-cache-dtype {d} (a KV cache dtype other than --dtype)"));
        }
        if self.trust_remote_code {
            asked.push("--trust-remote-code (Tessera runs only its own model code)".into());
        }
        if asked.is_empty() {
            return Ok(());
        }
        Err(format!("not supported by Tessera: {}; remove the flag (or its environment variable) to start", asked.join(", ")))
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    text_generation_router::logging::init(args.json_output);
    let code = match run(args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    };
    std::process::exit(code);
}

/// The model directory: a local path as given, else the shard's `prepare-model`, which converts
/// the embedded default once or downloads a hub repository into the hub cache. Its log lines
/// (download progress, conversion) are re-emitted as they come.
async fn resolve_model(args: &Args) -> Result<PathBuf, String> {
    if let Some(id) = &args.model_id {
        let p = PathBuf::from(id);
        if p.is_dir() && args.revision.is_none() {
            return p.canonicalize().map_err(|e| format!("{id}: {e}"));
        }
    }
    tracing::info!("resolving model {}", args.model_id.as_deref().unwrap_or("(default)"));
    let mut cmd = Command::new(&args.server_bin);
    cmd.arg("prepare-model").args(args.model_id.iter());
    if let Some(r) = &args.revision {
        cmd.arg(format!("--revision={r}"));
    }
    cmd.envs(hub_env(args)).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    die_with_us(&mut cmd); // a download must not outlive a launcher that was stopped
    let mut child = cmd.spawn().map_err(|e| spawn_error(&args.server_bin, "--server-bin", &e))?;
    let mut stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let relay = async {
        let mut lines = BufReader::new(stderr).lines();
        let mut last = std::collections::VecDeque::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let text = shard_log::emit("prepare-model", &line, true);
            if !text.trim().is_empty() {
                last.push_back(text);
                if last.len() > 5 {
                    last.pop_front();
                }
            }
        }
        last
    };
    let mut out = String::new();
    let (last, read, status) = tokio::join!(relay, stdout.read_to_string(&mut out), child.wait());
    read.map_err(|e| format!("reading prepare-model's output: {e}"))?;
    let status = status.map_err(|e| format!("waiting for prepare-model: {e}"))?;
    if !status.success() {
        let last: Vec<String> = last.into();
        return Err(format!("resolving the model failed ({status}): {}", last.join(" | ")));
    }
    Ok(PathBuf::from(out.lines().last().unwrap_or("").trim()))
}

/// The environment of everything that reads the hub cache: JSON logs, and --huggingface-hub-cache
/// as the variables huggingface_hub reads.
fn hub_env(args: &Args) -> Vec<(&'static str, String)> {
    let mut env = vec![("TESSERA_LOG_FORMAT", "json".to_string())];
    if let Some(c) = &args.huggingface_hub_cache {
        env.push(("HF_HUB_CACHE", c.display().to_string()));
        env.push(("HUGGINGFACE_HUB_CACHE", c.display().to_string()));
    }
    env
}

fn router_bin(args: &Args) -> PathBuf {
    if let Some(p) = &args.router_bin {
        return p.clone();
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("text-generation-router")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("text-generation-router"),
    }
}

async fn run(args: Args) -> Result<i32, String> {
    args.unsupported.check()?;
    for w in args.inert.warnings() {
        tracing::warn!("{w}");
    }
    args.limits.check()?;
    let num_shard = shard_count(args.sharded, args.num_shard, visible_gpus())?;
    let paths: Vec<String> = (0..num_shard).map(|rank| format!("{}-{rank}", args.shard_uds_path)).collect();
    for p in &paths {
        check_socket_free(p).await?;
    }
    let model_dir = resolve_model(&args).await?;
    tracing::info!(model = %model_dir.display(), shards = num_shard, "starting");
    let mut children = Children::new();
    // Shards report it in Info; we and the router refuse a shard that does not (one of another
    // instance that took the socket path).
    let token = launch_token()?;
    // The tensor-parallel group's rendezvous: rank 0 listens on a free local port.
    let master_port = free_port()?;

    for rank in 0..num_shard {
        let mut cmd = Command::new(&args.server_bin);
        cmd.arg("serve")
            .arg(&model_dir)
            .arg(format!("--uds-path={}", args.shard_uds_path))
            .arg(format!("--rank={rank}"))
            .arg(format!("--world-size={num_shard}"))
            .arg("--master-addr=127.0.0.1")
            .arg(format!("--master-port={master_port}"))
            .arg(format!("--cuda-memory-fraction={}", args.cuda_memory_fraction))
            .arg(format!("--cuda-graphs={}", args.cuda_graphs))
            .arg(format!("--lora-adapters={}", args.lora_adapters))
            .arg(format!("--max-active-adapters={}", args.max_active_adapters))
            .arg(format!("--max-lora-rank={}", args.max_lora_rank));
        if let Some(src) = &args.adapter_source {
            cmd.arg("--adapter-source").arg(src);
        }
        if let Some(d) = &args.dtype {
            cmd.arg(format!("--dtype={d}"));
        }
        if let Some(ep) = &args.service.otlp_endpoint {
            cmd.arg(format!("--otlp-endpoint={ep}")).arg(format!("--otlp-service-name={}", args.service.otlp_service_name));
        }
        cmd.env("TESSERA_LAUNCH_TOKEN", &token).envs(hub_env(&args));
        children.spawn(&format!("shard-{rank}"), cmd, Output::Shard, "--server-bin")?;
    }
    let deadline = Duration::from_secs(args.shard_startup_timeout);
    for (rank, path) in paths.iter().enumerate() {
        let waited = tokio::select! {
            r = wait_for_shard(path, deadline, &token) => r,
            exited = children.next_exit() => Err(format!("{exited}\n(before becoming healthy)")),
        };
        if let Err(e) = waited {
            children.stop_all(Duration::from_secs(5)).await;
            return Err(e);
        }
        tracing::info!(rank, "shard ready");
    }

    let mut cmd = Command::new(router_bin(&args));
    cmd.arg(format!("--port={}", args.port))
        .arg(format!("--hostname={}", args.hostname))
        .arg(format!("--master-shard-uds-path={}-0", args.shard_uds_path))
        .arg("--tokenizer-dir")
        .arg(&model_dir)
        .arg(format!("--model-id={}", served_name(&args)))
        .arg(format!("--shutdown-timeout={}", args.shutdown_timeout))
        .args(args.limits.to_args());
    let (service_args, service_env) = args.service.to_args();
    cmd.args(service_args).envs(service_env).env("TESSERA_LAUNCH_TOKEN", &token);
    if args.json_output {
        cmd.arg("--json-output");
    }
    let router = children.spawn("router", cmd, Output::Verbatim, "--router-bin")?;
    // The router drains for --shutdown-timeout, then ends what is left and closes its
    // connections within a few seconds.
    let drain = Duration::from_secs(args.shutdown_timeout + 15);
    children.supervise(router, drain, watchdog(paths, Duration::from_secs(args.shard_watchdog_timeout))).await
}

/// Shards to start from --sharded and --num-shard (TGI's rules), given the visible GPUs.
fn shard_count(sharded: Option<bool>, num_shard: Option<usize>, gpus: usize) -> Result<usize, String> {
    match (sharded, num_shard) {
        (_, Some(0)) => Err("--num-shard must be at least 1".into()),
        (None, n) => Ok(n.unwrap_or(1)),
        (Some(false), None | Some(1)) => Ok(1),
        (Some(false), Some(n)) => Err(format!("--sharded false runs one shard, but --num-shard is {n}")),
        (Some(true), Some(1)) => Err("--sharded true needs --num-shard of at least 2".into()),
        (Some(true), Some(n)) => Ok(n),
        (Some(true), None) if gpus >= 2 => Ok(gpus),
        (Some(true), None) => Err(format!("--sharded true without --num-shard needs at least 2 visible GPUs; {gpus} found")),
    }
}

/// GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the NVIDIA device files.
fn visible_gpus() -> usize {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return v.split(',').filter(|d| !d.trim().is_empty()).count();
    }
    std::fs::read_dir("/dev")
        .map(|d| d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("nvidia")).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
            .count())
        .unwrap_or(0)
}

/// The model's name to clients: --served-model-name, else --model-id, else the default's hub id.
fn served_name(args: &Args) -> &str {
    args.served_model_name.as_deref().or(args.model_id.as_deref()).unwrap_or("HuggingFaceTB/SmolLM2-135M-Instruct")
}

/// A local TCP port free now (the OS's pick).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port for the shards' rendezvous: {e}"))
}

/// 128 random bits, hex.
fn launch_token() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tgi_flags_for_missing_features_are_refused_by_name() {
        let a = Args::parse_from(["x", "--quantize", "awq", "--trust-remote-code"]);
        let e = a.unsupported.check().unwrap_err();
        assert!(e.contains("--quantize awq") && e.contains("--trust-remote-code") && !e.contains("--speculate"), "{e}");
        assert!(Args::parse_from(["x"]).unsupported.check().is_ok());
    }

    #[test]
    fn sharded_and_num_shard_follow_tgi() {
        assert_eq!(shard_count(None, None, 0), Ok(1));
        assert_eq!(shard_count(None, Some(3), 0), Ok(3));
        assert_eq!(shard_count(Some(false), None, 8), Ok(1));
        assert!(shard_count(Some(false), Some(2), 8).unwrap_err().contains("--num-shard is 2"));
        assert_eq!(shard_count(Some(true), None, 4), Ok(4));
        assert_eq!(shard_count(Some(true), Some(2), 0), Ok(2));
        assert!(shard_count(Some(true), None, 1).unwrap_err().contains("1 found"));
        assert!(shard_count(Some(true), Some(1), 8).is_err());
        assert!(shard_count(None, Some(0), 8).is_err());
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        // The container image and the Helm chart set flags through the environment.
        use clap::CommandFactory;
        for a in Args::command().get_arguments() {
            let id = a.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(a.get_env().is_some(), "--{id} has no environment variable");
            }
        }
    }

    #[test]
    fn tgi_scheduler_knobs_are_accepted_with_a_warning() {
        let a = Args::parse_from(["x", "--max-waiting-tokens", "20", "--waiting-served-ratio", "1.2"]);
        let w = a.inert.warnings();
        assert!(w.len() == 2 && w[0].starts_with("--max-waiting-tokens 20 has no effect"), "{w:?}");
        assert!(Args::parse_from(["x"]).inert.warnings().is_empty());
    }

    #[test]
    fn the_served_name_replaces_the_model_id() {
        assert_eq!(served_name(&Args::parse_from(["x", "--model-id", "/m", "--served-model-name", "mine"])), "mine");
        assert_eq!(served_name(&Args::parse_from(["x", "--model-id", "/m"])), "/m");
    }
}
