//! Child processes: spawning with log forwarding, waiting, stopping them in order, and the
//! watchdog that ends everything when a shard stops answering.

use std::collections::{HashMap, VecDeque};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use text_generation_router::shard::client::ShardClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::shard_log;

/// Lines of a child's output kept to explain its exit.
const TAIL_LINES: usize = 20;

type Tail = Arc<Mutex<VecDeque<String>>>;

pub struct Children {
    pids: HashMap<String, u32>,
    order: Vec<String>,
    tails: HashMap<String, Tail>,
    exits_tx: mpsc::UnboundedSender<(String, std::io::Result<ExitStatus>)>,
    exits: mpsc::UnboundedReceiver<(String, std::io::Result<ExitStatus>)>,
}

/// How a child's output reaches our log.
#[derive(Clone, Copy, PartialEq)]
pub enum Output {
    /// A shard: JSON log records re-emitted at their own level (`shard_log`).
    Shard,
    /// The router, which already logs in our format: passed through as is.
    Verbatim,
}

/// "`bin` not found ..." for a missing executable, else the error as is.
pub fn spawn_error(bin: &str, flag: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!("`{bin}` was not found: install it (`make install`) or put it on PATH, or pass {flag}")
    } else {
        format!("starting `{bin}`: {e}")
    }
}

/// Marks a child to get SIGTERM when the launcher exits, however it exits.
pub fn die_with_us(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only marks this child to be signalled when we exit.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from));
    }
}

impl Children {
    pub fn new() -> Self {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Self { pids: HashMap::new(), order: vec![], tails: HashMap::new(), exits_tx, exits }
    }

    /// Starts a child in a process group of its own, so that a terminal's Ctrl-C (SIGINT to the
    /// foreground group) reaches only us and we stop the children in order. Children also get
    /// SIGTERM if we die.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, output: Output, flag: &str) -> Result<String, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
        die_with_us(&mut cmd);
        let bin = cmd.as_std().get_program().to_string_lossy().to_string();
        let mut child = cmd.spawn().map_err(|e| spawn_error(&bin, flag, &e))?;
        let pid = child.id().ok_or_else(|| format!("{name} exited at once"))?;
        let tail: Tail = Arc::default();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, name.to_string(), output, false, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, name.to_string(), output, true, tail.clone()));
        }
        let tx = self.exits_tx.clone();
        let n = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((n, status));
        });
        self.pids.insert(name.to_string(), pid);
        self.order.push(name.to_string());
        self.tails.insert(name.to_string(), tail);
        tracing::info!(child = name, pid, "started");
        Ok(name.to_string())
    }

    /// Waits for any child to exit; describes it, with its last lines of output.
    pub async fn next_exit(&mut self) -> String {
        match self.exits.recv().await {
            Some((name, status)) => {
                self.pids.remove(&name);
                // Let the output readers catch up with what the child wrote before it died.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let tail = self.tails.get(&name).map(|t| t.lock().unwrap().iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
                let mut msg = format!("{name} exited ({})", describe(&status));
                if !tail.is_empty() {
                    msg.push_str(&format!("; its last lines:\n  {}", tail.join("\n  ")));
                }
                msg
            }
            None => "all children gone".into(),
        }
    }

    /// Runs until a child dies or the watchdog fires (-> stop all, exit 1), or we get
    /// SIGTERM/SIGINT (-> drain the router, stop the shards, exit with the router's status).
    pub async fn supervise(mut self, router: String, drain: Duration, watchdog: impl std::future::Future<Output = String>) -> Result<i32, String> {
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            exited = self.next_exit() => {
                tracing::error!("{exited}: stopping everything");
                self.stop_all(Duration::from_secs(5)).await;
                Ok(1)
            }
            why = watchdog => {
                tracing::error!("{why}: stopping everything so that the orchestrator restarts the server");
                self.stop_all(Duration::from_secs(5)).await;
                Ok(1)
            }
            _ = term.recv() => Ok(self.shutdown(&router, drain).await),
            _ = int.recv() => Ok(self.shutdown(&router, drain).await),
        }
    }

    async fn shutdown(&mut self, router: &str, drain: Duration) -> i32 {
        tracing::info!("shutdown: draining the router");
        let mut code = 0;
        if let Some(&pid) = self.pids.get(router) {
            signal_pid(pid, Signal::SIGTERM);
            match self.wait_for(router, drain).await {
                Some(Ok(s)) if s.success() => {}
                Some(other) => {
                    tracing::warn!("router ended badly: {}", describe(&other));
                    code = 1;
                }
                None => {
                    tracing::warn!("router did not drain in {drain:?}; killing it");
                    code = 1;
                }
            }
        }
        self.stop_all(Duration::from_secs(10)).await;
        tracing::info!("shutdown complete");
        code
    }

    /// Waits for one named child to exit, up to `timeout`; exits of others are recorded.
    async fn wait_for(&mut self, name: &str, timeout: Duration) -> Option<std::io::Result<ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.exits.recv()).await {
                Ok(Some((n, status))) => {
                    self.pids.remove(&n);
                    if n == name {
                        return Some(status);
                    }
                }
                _ => return None,
            }
        }
    }

    /// SIGTERM to every live child (router first), SIGKILL to those still alive after `grace`
    /// (a stopped process, SIGSTOP, only dies of that).
    pub async fn stop_all(&mut self, grace: Duration) {
        for name in self.order.iter().rev() {
            if let Some(&pid) = self.pids.get(name) {
                signal_pid(pid, Signal::SIGTERM);
            }
        }
        let end = Instant::now() + grace;
        while !self.pids.is_empty() {
            let Some(left) = end.checked_duration_since(Instant::now()) else { break };
            match tokio::time::timeout(left, self.exits.recv()).await {
                Ok(Some((n, _))) => {
                    self.pids.remove(&n);
                }
                _ => break,
            }
        }
        for (name, pid) in self.pids.drain() {
            tracing::warn!(child = %name, "did not stop in time: SIGKILL");
            signal_pid(pid, Signal::SIGKILL);
        }
    }
}

async fn forward_lines<R: tokio::io::AsyncRead + Unpin>(pipe: R, name: String, output: Output, stderr: bool, tail: Tail) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let text = match output {
            Output::Shard => shard_log::emit(&name, &line, stderr),
            Output::Verbatim => {
                eprintln!("{line}");
                line
            }
        };
        let mut t = tail.lock().unwrap();
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(text);
    }
}

fn signal_pid(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

fn describe(s: &std::io::Result<ExitStatus>) -> String {
    match s {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// How long one health check of a shard may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a health check failed.
enum CheckError {
    /// No answer, or an error: worth asking again.
    Unanswered(String),
    /// The shard answered with another launch's token: another instance holds the socket.
    Foreign(String),
}

/// One health check: the shard answers, with the expected launch token when `token` is given.
async fn check_shard(client: &mut Option<ShardClient>, path: &str, token: Option<&str>) -> Result<(), CheckError> {
    let unanswered = |e: text_generation_router::shard::client::ClientError| CheckError::Unanswered(e.to_string());
    let fut = async {
        if client.is_none() {
            *client = Some(ShardClient::connect_uds(path).await.map_err(unanswered)?);
        }
        let c = client.as_mut().expect("connected above");
        c.health().await.map_err(unanswered)?;
        if let Some(token) = token {
            if c.info().await.map_err(unanswered)?.launch_token != token {
                return Err(CheckError::Foreign(format!(
                    "the shard at {path} was not started by this launcher: another Tessera instance uses this \
                     --shard-uds-path; give each instance its own"
                )));
            }
        }
        Ok(())
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => {
            *client = None; // a fresh connection next time
            Err(CheckError::Unanswered(format!("no answer within {HEALTH_TIMEOUT:?}")))
        }
    }
}

/// Polls the shard's socket until it answers Health with our launch token, up to `timeout`. A
/// shard of another instance (another token) is an error at once.
pub async fn wait_for_shard(path: &str, timeout: Duration, token: &str) -> Result<(), String> {
    let end = Instant::now() + timeout;
    let mut last = String::from("no socket yet");
    let mut client = None;
    while Instant::now() < end {
        if std::path::Path::new(path).exists() {
            match check_shard(&mut client, path, Some(token)).await {
                Ok(()) => return Ok(()),
                Err(CheckError::Foreign(e)) => return Err(e),
                Err(CheckError::Unanswered(e)) => {
                    client = None;
                    last = e;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("shard at {path} not healthy after {timeout:?}: {last}"))
}

/// Refuses a socket path another live server listens on (a second instance with the same
/// `--shard-uds-path`); a stale socket file is left for the shard to replace.
pub async fn check_socket_free(path: &str) -> Result<(), String> {
    if !std::path::Path::new(path).exists() {
        return Ok(());
    }
    match tokio::time::timeout(HEALTH_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
        Ok(Err(_)) => Ok(()), // nobody listens: stale
        _ => Err(format!(
            "{path} is in use by another running server (another Tessera instance?): pass a different --shard-uds-path"
        )),
    }
}

/// Resolves when some shard has not answered a health check for `limit` (checked every 2 s);
/// never when `limit` is zero.
pub async fn watchdog(paths: Vec<String>, limit: Duration) -> String {
    if limit.is_zero() {
        return std::future::pending().await;
    }
    let mut clients: Vec<Option<ShardClient>> = vec![None; paths.len()];
    let mut last_ok = vec![Instant::now(); paths.len()];
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (i, path) in paths.iter().enumerate() {
            match check_shard(&mut clients[i], path, None).await {
                Ok(()) => last_ok[i] = Instant::now(),
                Err(CheckError::Unanswered(e) | CheckError::Foreign(e)) => tracing::warn!(shard = i, "health check failed: {e}"),
            }
            if last_ok[i].elapsed() > limit {
                return format!("shard {i} ({path}) has not answered for {} s (--shard-watchdog-timeout)", last_ok[i].elapsed().as_secs());
            }
        }
    }
}
