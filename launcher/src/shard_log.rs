//! Shard output in our log. Shards started by the launcher log JSON records, one per line
//! (`TESSERA_LOG_FORMAT=json`); each is re-emitted through our logger at its own level, a
//! traceback included in its message. Anything else a shard prints (output before logging is
//! set up, a native library's warning) is re-emitted as is: at WARN from stderr, INFO from stdout.

use serde::Deserialize;
use tracing::Level;

#[derive(Deserialize)]
struct Record {
    level: String,
    #[serde(default)]
    logger: String,
    message: String,
    #[serde(default)]
    exc_info: Option<String>,
}

/// The level and text of one line of shard output.
pub fn parse(line: &str, stderr: bool) -> (Level, String) {
    match serde_json::from_str::<Record>(line) {
        Ok(r) => {
            let level = match r.level.as_str() {
                "CRITICAL" | "ERROR" => Level::ERROR,
                "WARNING" => Level::WARN,
                "DEBUG" => Level::DEBUG,
                _ => Level::INFO,
            };
            let mut text = if r.logger.is_empty() { r.message } else { format!("{}: {}", r.logger, r.message) };
            if let Some(exc) = r.exc_info {
                text.push('\n');
                text.push_str(&exc);
            }
            (level, text)
        }
        Err(_) if stderr => (Level::WARN, line.to_string()),
        Err(_) => (Level::INFO, line.to_string()),
    }
}

/// Re-emits one line of `child`'s output; returns its text.
pub fn emit(child: &str, line: &str, stderr: bool) -> String {
    let (level, text) = parse(line, stderr);
    match level {
        Level::ERROR => tracing::error!(target: "tessera::shard", child, "{text}"),
        Level::WARN => tracing::warn!(target: "tessera::shard", child, "{text}"),
        Level::DEBUG | Level::TRACE => tracing::debug!(target: "tessera::shard", child, "{text}"),
        Level::INFO => tracing::info!(target: "tessera::shard", child, "{text}"),
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_level_and_traceback() {
        let line = r#"{"level": "ERROR", "logger": "text_generation_server.server", "message": "shard call failed", "exc_info": "Traceback (most recent call last):\n  ...\nValueError: x"}"#;
        let (level, text) = parse(line, true);
        assert_eq!(level, Level::ERROR);
        assert!(text.starts_with("text_generation_server.server: shard call failed\nTraceback"), "{text}");
        assert_eq!(parse(r#"{"level": "INFO", "message": "loaded"}"#, true), (Level::INFO, "loaded".to_string()));
        assert_eq!(parse(r#"{"level": "WARNING", "message": "w"}"#, false).0, Level::WARN);
    }

    #[test]
    fn other_lines_are_warnings_on_stderr() {
        assert_eq!(parse("UserWarning: something", true), (Level::WARN, "UserWarning: something".to_string()));
        assert_eq!(parse("plain", false).0, Level::INFO);
    }
}
