//! Child processes: spawning with log forwarding, waiting, and stopping them in order.

use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use text_generation_router::client::ShardClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

pub struct Children {
    pids: HashMap<String, u32>,
    order: Vec<String>,
    exits_tx: mpsc::UnboundedSender<(String, std::io::Result<ExitStatus>)>,
    exits: mpsc::UnboundedReceiver<(String, std::io::Result<ExitStatus>)>,
}

impl Children {
    pub fn new() -> Self {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Self { pids: HashMap::new(), order: vec![], exits_tx, exits }
    }

    /// Starts a child. Its output is re-emitted through our log (`relog`) or passed through
    /// as is (the router already logs in our format). Children get SIGTERM if we die.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, relog: bool) -> Result<String, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only marks this child to be signalled when we exit.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
        let pid = child.id().ok_or_else(|| format!("{name} exited at once"))?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, name.to_string(), relog));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, name.to_string(), relog));
        }
        let tx = self.exits_tx.clone();
        let n = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((n, status));
        });
        self.pids.insert(name.to_string(), pid);
        self.order.push(name.to_string());
        tracing::info!(child = name, pid, "started");
        Ok(name.to_string())
    }

    /// Waits for any child to exit; describes it.
    pub async fn next_exit(&mut self) -> String {
        match self.exits.recv().await {
            Some((name, status)) => {
                self.pids.remove(&name);
                format!("{name} exited ({})", describe(&status))
            }
            None => "all children gone".into(),
        }
    }

    /// Runs until a child dies (-> stop all, exit 1) or we get SIGTERM/SIGINT (-> drain the
    /// router, stop the shards, exit with the router's status).
    pub async fn supervise(mut self, router: String, drain: Duration) -> Result<i32, String> {
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            exited = self.next_exit() => {
                tracing::error!("{exited}: stopping everything");
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

    /// SIGTERM to every live child (router first), SIGKILL to those still alive after `grace`.
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

async fn forward_lines<R: tokio::io::AsyncRead + Unpin>(pipe: R, name: String, relog: bool) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if relog {
            tracing::info!(target: "tessera::shard", child = %name, "{line}");
        } else {
            eprintln!("{line}");
        }
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

/// Polls the shard's socket until Health answers, up to `timeout`.
pub async fn wait_for_shard(path: &str, timeout: Duration) -> Result<(), String> {
    let end = Instant::now() + timeout;
    let mut last = String::from("no socket yet");
    while Instant::now() < end {
        if std::path::Path::new(path).exists() {
            match ShardClient::connect_uds(path).await {
                Ok(mut c) => match c.health().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("shard at {path} not healthy after {timeout:?}: {last}"))
}
