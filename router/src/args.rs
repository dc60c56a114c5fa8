//! Flags shared by the launcher and the router, declared once and flattened into both.

use clap::Args;

/// A feature switched on or off on the command line (`--flag on|off`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// Request size and batching limits.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Longest prompt accepted, in tokens.
    #[arg(long, env = "MAX_INPUT_TOKENS", default_value_t = 1024)]
    pub max_input_tokens: u32,
    /// Longest prompt + generation accepted, in tokens.
    #[arg(long, env = "MAX_TOTAL_TOKENS", default_value_t = 2048)]
    pub max_total_tokens: u32,
    /// Most prompt tokens computed in one step (the prompt share of --max-batch-tokens); longer
    /// prompts are computed in chunks over several steps.
    #[arg(long, env = "MAX_BATCH_PREFILL_TOKENS", default_value_t = 4096)]
    pub max_batch_prefill_tokens: u32,
    /// Most tokens computed in one step: a token for each running request first, then prompt
    /// chunks in what is left (at most --max-batch-prefill-tokens). Unset: --max-batch-prefill-tokens.
    #[arg(long, env = "MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<u32>,
    /// Most tokens (prompt + generated) held in the KV cache at once; unset: sized by the shard's warmup.
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<u32>,
    /// Most requests in flight (queued or running); beyond it new requests get 429.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Most stop sequences per request.
    #[arg(long, env = "MAX_STOP_SEQUENCES", default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Most requests per running batch; unset: bounded by KV blocks only.
    #[arg(long, env = "MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Most sequences per request (`best_of`, OpenAI `n`).
    #[arg(long, env = "MAX_BEST_OF", default_value_t = 2)]
    pub max_best_of: u32,
    /// Most alternatives per token (`top_n_tokens`, OpenAI `top_logprobs`/`logprobs`).
    #[arg(long, env = "MAX_TOP_N_TOKENS", default_value_t = 5)]
    pub max_top_n_tokens: u32,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "PAYLOAD_LIMIT", default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Reuse the KV blocks of earlier prompts that begin the same way (same adapter): only the
    /// rest of a prompt is computed.
    #[arg(long, env = "PREFIX_CACHING", value_enum, default_value_t = Switch::On)]
    pub prefix_caching: Switch,
}

/// Service settings shared by the launcher and the router.
#[derive(Args, Debug, Clone)]
pub struct ServiceArgs {
    /// Bearer token required on every route but /health.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// OpenTelemetry collector (OTLP over HTTP, e.g. http://127.0.0.1:4318) to send traces to.
    #[arg(long, env = "OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Service name of the traces.
    #[arg(long, env = "OTLP_SERVICE_NAME", default_value = "tessera")]
    pub otlp_service_name: String,
    /// Seconds a client may take to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value_t = 30)]
    pub http_header_timeout: u64,
    /// Seconds a client may take to send a request body (408 beyond).
    #[arg(long, env = "HTTP_BODY_TIMEOUT", default_value_t = 60)]
    pub http_body_timeout: u64,
    /// Do not log one line per finished request.
    #[arg(long, env = "DISABLE_REQUEST_LOGGING")]
    pub disable_request_logging: bool,
    /// Origins whose browser pages may call the API (CORS), comma-separated; `*` allows any.
    /// Unset: no CORS headers (browsers refuse cross-origin calls).
    #[arg(long, env = "CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Chat template for /v1/chat/completions instead of the model's own: a Jinja file, or the
    /// template text itself.
    #[arg(long, env = "CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
}

impl ServiceArgs {
    /// The same settings as (argument, environment) for a child process; the API key goes
    /// through the environment so it does not show in `ps`.
    pub fn to_args(&self) -> (Vec<String>, Vec<(String, String)>) {
        let mut args = vec![
            format!("--otlp-service-name={}", self.otlp_service_name),
            format!("--http-header-timeout={}", self.http_header_timeout),
            format!("--http-body-timeout={}", self.http_body_timeout),
        ];
        let mut env = vec![];
        if let Some(e) = &self.otlp_endpoint {
            args.push(format!("--otlp-endpoint={e}"));
        }
        if self.disable_request_logging {
            args.push("--disable-request-logging".into());
        }
        if let Some(k) = &self.api_key {
            env.push(("API_KEY".to_string(), k.clone()));
        }
        if !self.cors_allow_origin.is_empty() {
            args.push(format!("--cors-allow-origin={}", self.cors_allow_origin.join(",")));
        }
        if let Some(t) = &self.chat_template {
            env.push(("CHAT_TEMPLATE".to_string(), t.clone())); // a template's text may be long and multi-line
        }
        (args, env)
    }
}

impl Default for LimitArgs {
    /// The flags' own defaults, read from their declarations (stated once, above), ignoring the
    /// environment.
    fn default() -> Self {
        use clap::FromArgMatches;
        let cmd = <LimitArgs as Args>::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None::<&'static str>));
        LimitArgs::from_arg_matches(&cmd.get_matches_from(["defaults"])).expect("every limit flag has a default or is optional")
    }
}

impl LimitArgs {
    /// The same limits as command-line arguments, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--max-input-tokens={}", self.max_input_tokens),
            format!("--max-total-tokens={}", self.max_total_tokens),
            format!("--max-batch-prefill-tokens={}", self.max_batch_prefill_tokens),
            format!("--max-concurrent-requests={}", self.max_concurrent_requests),
            format!("--max-stop-sequences={}", self.max_stop_sequences),
            format!("--max-best-of={}", self.max_best_of),
            format!("--max-top-n-tokens={}", self.max_top_n_tokens),
            format!("--payload-limit={}", self.payload_limit),
            format!("--prefix-caching={}", if self.prefix_caching.is_on() { "on" } else { "off" }),
        ];
        if let Some(t) = self.max_batch_total_tokens {
            a.push(format!("--max-batch-total-tokens={t}"));
        }
        if let Some(b) = self.max_batch_size {
            a.push(format!("--max-batch-size={b}"));
        }
        if let Some(t) = self.max_batch_tokens {
            a.push(format!("--max-batch-tokens={t}"));
        }
        a
    }

    /// Tokens per step (--max-batch-tokens, or the prompt share when unset).
    pub fn step_tokens(&self) -> u32 {
        self.max_batch_tokens.unwrap_or(self.max_batch_prefill_tokens)
    }

    /// The largest step the router may send: the token budget, or one whole prompt that asks for
    /// prompt logprobs (never split into chunks).
    pub fn largest_step(&self) -> u32 {
        self.step_tokens().max(self.max_input_tokens)
    }

    /// Checks the limits against each other; the message names the flags.
    pub fn check(&self) -> Result<(), String> {
        if self.max_input_tokens == 0 {
            return Err("--max-input-tokens must be positive".into());
        }
        if self.max_input_tokens >= self.max_total_tokens {
            return Err(format!(
                "--max-input-tokens ({}) must be < --max-total-tokens ({})",
                self.max_input_tokens, self.max_total_tokens
            ));
        }
        if self.max_batch_prefill_tokens == 0 || self.max_batch_tokens == Some(0) {
            return Err("--max-batch-prefill-tokens and --max-batch-tokens must be positive".into());
        }
        if let Some(total) = self.max_batch_total_tokens {
            if total < self.max_total_tokens {
                return Err(format!(
                    "--max-batch-total-tokens ({total}) must be >= --max-total-tokens ({})",
                    self.max_total_tokens
                ));
            }
        }
        if self.max_best_of == 0 {
            return Err("--max-best-of must be at least 1".into());
        }
        if self.max_concurrent_requests == 0 {
            return Err("--max-concurrent-requests must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn to_args_round_trips() {
        use clap::Parser;
        let a = LimitArgs { max_batch_total_tokens: Some(9999), max_batch_size: Some(3), max_batch_tokens: Some(77), prefix_caching: Switch::Off,
                            ..Default::default() };
        let mut argv = vec!["x".to_string()];
        argv.extend(a.to_args());
        let b = Wrap::parse_from(argv).limits;
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[derive(clap::Parser)]
    struct WrapService {
        #[command(flatten)]
        service: ServiceArgs,
    }

    #[test]
    fn service_args_round_trip() {
        use clap::Parser;
        let argv = ["x", "--api-key", "k", "--http-header-timeout", "7", "--http-body-timeout", "9", "--disable-request-logging",
                    "--cors-allow-origin", "https://a.example,https://b.example"];
        let a = WrapService::parse_from(argv).service;
        let (args, env) = a.to_args();
        let mut argv = vec!["x".to_string()];
        argv.extend(args);
        let b = WrapService::parse_from(argv).service;
        assert_eq!(env, vec![("API_KEY".to_string(), "k".to_string())]);
        assert_eq!((b.http_header_timeout, b.http_body_timeout, b.disable_request_logging), (7, 9, true));
        assert_eq!(b.cors_allow_origin, vec!["https://a.example", "https://b.example"]);
    }

    #[test]
    fn defaults_are_consistent() {
        assert!(LimitArgs::default().check().is_ok());
    }

    #[test]
    fn input_must_be_below_total() {
        let a = LimitArgs { max_input_tokens: 2048, ..Default::default() };
        assert!(a.check().unwrap_err().contains("--max-total-tokens"));
    }

    #[test]
    fn step_budgets_must_be_positive_but_may_be_below_a_prompt() {
        let a = LimitArgs { max_batch_prefill_tokens: 0, ..Default::default() };
        assert!(a.check().unwrap_err().contains("--max-batch-prefill-tokens"));
        let a = LimitArgs { max_batch_tokens: Some(0), ..Default::default() };
        assert!(a.check().unwrap_err().contains("--max-batch-tokens"));
        // prompts longer than a step's budget are chunked
        let a = LimitArgs { max_batch_prefill_tokens: 10, max_batch_tokens: Some(16), ..Default::default() };
        assert!(a.check().is_ok());
        assert_eq!((a.step_tokens(), a.largest_step()), (16, 1024));
    }
}
