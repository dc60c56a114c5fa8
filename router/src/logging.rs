//! One log format for the launcher and the router (the launcher re-emits shard lines through it).

/// Logs to stderr, filtered by `LOG_LEVEL` (default info); JSON lines with `json`; colours only on a terminal.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        b.json().init()
    } else {
        b.init()
    }
}
