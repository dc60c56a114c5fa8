//! Whether the shards answer. A background ping keeps a flag the guard reads (new requests get
//! 503 while a shard does not answer, instead of queueing behind a frozen one), and `/health`
//! asks the shards live. Every shard call made on behalf of an HTTP request that does not run a
//! step (health, adapter listing) is bounded by `error::SHARD_TIMEOUT`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::shard::client::ShardedClient;
use crate::error::{bounded, InferError};

#[derive(Clone)]
pub struct ShardHealth {
    client: ShardedClient,
    ok: Arc<AtomicBool>,
}

impl ShardHealth {
    pub fn new(client: ShardedClient) -> Self {
        Self { client, ok: Arc::new(AtomicBool::new(true)) }
    }

    /// Pings the shards every `every` (each ping bounded by `SHARD_TIMEOUT`), for as long as
    /// the process runs.
    pub fn spawn_monitor(&self, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = me.check().await;
            }
        });
    }

    /// Whether the last ping was answered.
    pub fn ok(&self) -> bool {
        self.ok.load(Ordering::SeqCst)
    }

    /// Asks every shard now.
    pub async fn check(&self) -> Result<(), InferError> {
        let mut c = self.client.clone();
        let r = bounded("shard health", c.health()).await;
        let was = self.ok.swap(r.is_ok(), Ordering::SeqCst);
        match (&r, was) {
            (Err(e), true) => tracing::error!("{e}: refusing new requests until it answers"),
            (Ok(()), false) => tracing::info!("the shards answer again"),
            _ => {}
        }
        r
    }
}
