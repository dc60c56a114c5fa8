//! Which LoRA adapters are resident on the shards, decided here.
//!
//! A request naming an adapter first takes a lease on it (`acquire`), before it enters the
//! queue. A resident adapter is leased at once; a missing one is loaded by a background task
//! (`LoadAdapter` on every shard, beside the running steps) while its requests wait outside
//! the queue, so base-model requests and other adapters' requests keep flowing. At most
//! `capacity` adapters (the shards' `--max-active-adapters`) are resident or loading; when full,
//! the least recently used adapter that no request holds is unloaded first, and when every
//! resident adapter is in use, new ones wait until one is released. A failed load fails only
//! the requests that waited for it.
//!
//! `/v1/load_lora_adapter` registers (and prefetches) an adapter; `/v1/unload_lora_adapter`
//! forgets one: new requests for it are refused at once, and its device memory is freed as
//! soon as the requests already holding it have finished.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Notify;

use crate::shard::client::{self, ShardedClient};
use crate::error::InferError;
use crate::shard::pb;

/// The shard calls adapter management needs: the real client, or a fake in tests.
pub trait AdapterShards: Send + Sync + 'static {
    fn load(&self, req: pb::LoadAdapterRequest) -> BoxFuture<'static, client::Result<pb::LoadAdapterResponse>>;
    fn unload(&self, name: String, forget: bool) -> BoxFuture<'static, client::Result<()>>;
    fn list(&self) -> BoxFuture<'static, client::Result<Vec<pb::AdapterInfo>>>;
}

impl AdapterShards for ShardedClient {
    fn load(&self, req: pb::LoadAdapterRequest) -> BoxFuture<'static, client::Result<pb::LoadAdapterResponse>> {
        let mut c = self.clone();
        async move { c.load_adapter(req).await }.boxed()
    }
    fn unload(&self, name: String, forget: bool) -> BoxFuture<'static, client::Result<()>> {
        let mut c = self.clone();
        async move { c.unload_adapter(name, forget).await }.boxed()
    }
    fn list(&self) -> BoxFuture<'static, client::Result<Vec<pb::AdapterInfo>>> {
        let mut c = self.clone();
        async move { c.list_adapters().await }.boxed()
    }
}

type LoadFuture = Shared<BoxFuture<'static, Result<(), InferError>>>;

enum Acquire {
    Ready(Arc<AdapterLease>),
    Loading(Arc<AdapterLease>, LoadFuture),
    /// Every entry holds an adapter in use.
    Full,
}

enum EntryState {
    Loading(LoadFuture),
    Resident,
}

struct Entry {
    state: EntryState,
    /// Leases held (requests queued or running, and waiters of a load).
    users: usize,
    last_used: u64,
    /// Distinguishes this entry from a later one of the same name.
    generation: u64,
    /// Unloaded by the API while in use: freed when `users` reaches 0.
    doomed: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Unloaded through the API: refused until registered again.
    forgotten: HashSet<String>,
    /// Names the shards listed last time we asked (refreshed when a request names another), so
    /// that an unknown name is refused before it takes an entry, evicts anything or labels a metric.
    known: HashSet<String>,
    tick: u64,
}

struct Inner {
    shards: Arc<dyn AdapterShards>,
    capacity: usize,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Clone)]
pub struct Adapters {
    inner: Arc<Inner>,
}

/// A request's hold on a resident adapter; released on drop.
pub struct AdapterLease {
    inner: Arc<Inner>,
    name: String,
    generation: u64,
}

impl AdapterLease {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Who may share prefix-cache blocks with this request: the adapter as this load read it (a
    /// reload, from the same files or others, starts afresh).
    pub fn cache_key(&self) -> String {
        format!("{}@{}", self.name, self.generation)
    }
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock().unwrap();
        let Some(entry) = st.entries.get_mut(&self.name) else { return };
        if entry.generation != self.generation {
            return;
        }
        entry.users = entry.users.saturating_sub(1);
        if entry.users > 0 {
            return;
        }
        if entry.doomed {
            st.entries.remove(&self.name);
            resident_gauge(&st);
            let (shards, name) = (self.inner.shards.clone(), self.name.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = shards.unload(name.clone(), true).await {
                        tracing::warn!(adapter = name, "deferred unload failed: {e}");
                    }
                });
            }
        }
        drop(st);
        self.inner.changed.notify_waiters();
    }
}

impl Adapters {
    pub fn new(shards: Arc<dyn AdapterShards>, capacity: usize) -> Self {
        let inner = Inner { shards, capacity: capacity.max(1), state: Mutex::new(State::default()), changed: Notify::new() };
        Self { inner: Arc::new(inner) }
    }

    /// Names resident or loading now.
    pub fn resident(&self) -> Vec<String> {
        let st = self.inner.state.lock().unwrap();
        let mut v: Vec<String> = st.entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// A lease on `name`, loading it first when needed; waits while every entry is in use.
    pub async fn acquire(&self, name: &str) -> Result<Arc<AdapterLease>, InferError> {
        self.check_known(name).await?;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = self.try_acquire(name)?;
            let (lease, load) = match next {
                Acquire::Ready(lease) => return Ok(lease),
                Acquire::Loading(lease, load) => (lease, load),
                Acquire::Full => {
                    notified.await; // every entry is busy: wait for a release
                    continue;
                }
            };
            load.await?;
            return Ok(lease);
        }
    }

    /// Refuses a name that is neither resident nor listed by the shards (asking them again when
    /// it is new to us).
    async fn check_known(&self, name: &str) -> Result<(), InferError> {
        {
            let st = self.inner.state.lock().unwrap();
            if st.forgotten.contains(name) {
                return Err(not_found(name, "was unloaded"));
            }
            if st.entries.contains_key(name) || st.known.contains(name) {
                return Ok(());
            }
        }
        self.list().await?;
        if self.inner.state.lock().unwrap().known.contains(name) {
            Ok(())
        } else {
            Err(not_found(name, "is neither loaded nor in the adapter source"))
        }
    }

    /// One look at the entries (no await while the lock is held).
    fn try_acquire(&self, name: &str) -> Result<Acquire, InferError> {
        let mut st = self.inner.state.lock().unwrap();
        if st.forgotten.contains(name) {
            return Err(not_found(name, "was unloaded"));
        }
        st.tick += 1;
        let tick = st.tick;
        if let Some(entry) = st.entries.get_mut(name) {
            entry.users += 1;
            entry.last_used = tick;
            let lease = self.lease(name, entry.generation);
            return Ok(match &entry.state {
                EntryState::Resident => Acquire::Ready(lease),
                EntryState::Loading(f) => Acquire::Loading(lease, f.clone()),
            });
        }
        let victim = if st.entries.len() < self.inner.capacity {
            None
        } else {
            let idle = st
                .entries
                .iter()
                .filter(|(_, s)| s.users == 0 && matches!(s.state, EntryState::Resident))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(n, _)| n.clone());
            match idle {
                Some(v) => Some(v),
                None => return Ok(Acquire::Full),
            }
        };
        if let Some(v) = &victim {
            st.entries.remove(v);
        }
        let generation = tick;
        let load = self.spawn_load(name.to_string(), victim, generation);
        let entry = Entry { state: EntryState::Loading(load.clone()), users: 1, last_used: tick, generation, doomed: false };
        st.entries.insert(name.to_string(), entry);
        Ok(Acquire::Loading(self.lease(name, generation), load))
    }

    fn lease(&self, name: &str, generation: u64) -> Arc<AdapterLease> {
        Arc::new(AdapterLease { inner: self.inner.clone(), name: name.to_string(), generation })
    }

    /// Unloads `victim` (if any) and loads `name` on every shard, in a task of its own so that
    /// it finishes even when every waiter has gone.
    fn spawn_load(&self, name: String, victim: Option<String>, generation: u64) -> LoadFuture {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            if let Some(v) = victim {
                match inner.shards.unload(v.clone(), false).await {
                    Ok(()) => metrics::counter!("tessera_adapter_evictions_total").increment(1),
                    Err(e) => tracing::warn!(adapter = v, "evicting failed: {e}"),
                }
            }
            let t0 = Instant::now();
            let req = pb::LoadAdapterRequest { name: name.clone(), path: None, activate: true };
            let result = inner.shards.load(req).await;
            let mut st = inner.state.lock().unwrap();
            let mine = st.entries.get(&name).is_some_and(|s| s.generation == generation);
            let out = match result {
                Ok(_) => {
                    metrics::counter!("tessera_adapter_loads_total").increment(1);
                    metrics::histogram!("tessera_adapter_load_duration_seconds").record(t0.elapsed().as_secs_f64());
                    tracing::info!(adapter = name, ms = t0.elapsed().as_millis() as u64, "adapter loaded");
                    if mine {
                        st.entries.get_mut(&name).unwrap().state = EntryState::Resident;
                    }
                    Ok(())
                }
                Err(e) => {
                    metrics::counter!("tessera_adapter_load_failures_total").increment(1);
                    tracing::warn!(adapter = name, "adapter load failed: {e}");
                    if mine {
                        st.entries.remove(&name);
                    }
                    Err(InferError::from(&e))
                }
            };
            resident_gauge(&st);
            drop(st);
            inner.changed.notify_waiters();
            out
        });
        async move { task.await.unwrap_or_else(|e| Err(InferError::Generation(format!("adapter load task: {e}")))) }
            .boxed()
            .shared()
    }

    /// `/v1/load_lora_adapter`: validates and registers `path` (inside the shards' adapter
    /// source) under `name` on every shard, then loads it in the background.
    pub async fn register(&self, name: &str, path: Option<String>) -> Result<(), InferError> {
        let req = pb::LoadAdapterRequest { name: name.to_string(), path, activate: false };
        self.inner.shards.load(req).await.map_err(|e| InferError::from(&e))?;
        {
            let mut st = self.inner.state.lock().unwrap();
            st.forgotten.remove(name);
            if let Some(entry) = st.entries.get_mut(name) {
                entry.doomed = false;
            }
        }
        let (me, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = me.acquire(&name).await {
                tracing::warn!(adapter = name, "prefetch failed: {e}");
            }
        });
        Ok(())
    }

    /// `/v1/unload_lora_adapter`: forgets `name` now and frees it once its requests are done.
    /// Err(None): the adapter is not known.
    pub async fn unregister(&self, name: &str) -> Result<(), Option<InferError>> {
        let known = self.list().await.map_err(Some)?.iter().any(|a| a.name == name);
        let busy = {
            let mut st = self.inner.state.lock().unwrap();
            if !known && !st.entries.contains_key(name) {
                return Err(None);
            }
            st.forgotten.insert(name.to_string());
            match st.entries.get_mut(name) {
                Some(entry) if entry.users > 0 => {
                    entry.doomed = true;
                    true
                }
                Some(_) => {
                    st.entries.remove(name);
                    resident_gauge(&st);
                    false
                }
                None => false,
            }
        };
        if !busy {
            self.inner.shards.unload(name.to_string(), true).await.map_err(|e| Some(InferError::from(&e)))?;
            self.inner.changed.notify_waiters();
        }
        Ok(())
    }

    /// Every adapter usable by name (registered, resident, or in the adapter source), minus the
    /// unloaded ones and those the shards report a problem with (which requests may still name,
    /// to learn the problem).
    pub async fn list(&self) -> Result<Vec<pb::AdapterInfo>, InferError> {
        let all = crate::error::bounded("listing adapters", self.inner.shards.list()).await?;
        let mut st = self.inner.state.lock().unwrap();
        st.known = all.iter().map(|a| a.name.clone()).collect();
        Ok(all.into_iter().filter(|a| a.problem.is_empty() && !st.forgotten.contains(&a.name)).collect())
    }
}

fn resident_gauge(st: &State) {
    let n = st.entries.values().filter(|s| matches!(s.state, EntryState::Resident)).count();
    metrics::gauge!("tessera_adapters_resident").set(n as f64);
}

fn not_found(name: &str, why: &str) -> InferError {
    InferError::Shard { code: pb::ErrorCode::AdapterNotFound, message: format!("adapter {name:?} {why}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Records calls; `slow` adapters take 200 ms to load, `missing` ones are listed but fail to
    /// load (deleted after listing); any other name in `SOURCE` is in the adapter source.
    #[derive(Default)]
    struct FakeShards {
        log: Mutex<Vec<String>>,
        loads: AtomicUsize,
        registered: Mutex<HashSet<String>>,
        lists: AtomicUsize,
    }

    const SOURCE: [&str; 6] = ["a", "b", "c", "slow-a", "slow-b", "missing-x"];

    impl AdapterShards for Arc<FakeShards> {
        fn load(&self, req: pb::LoadAdapterRequest) -> BoxFuture<'static, client::Result<pb::LoadAdapterResponse>> {
            let me = self.clone();
            async move {
                if req.name.starts_with("slow") {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if req.name.starts_with("missing") {
                    return Err(client::ClientError::Shard {
                        code: pb::ErrorCode::AdapterNotFound,
                        message: format!("adapter {:?} not found", req.name),
                        request_ids: vec![],
                    });
                }
                if req.activate {
                    me.loads.fetch_add(1, Ordering::SeqCst);
                } else {
                    me.registered.lock().unwrap().insert(req.name.clone());
                }
                me.log.lock().unwrap().push(format!("{}{}", if req.activate { "load " } else { "register " }, req.name));
                Ok(pb::LoadAdapterResponse::default())
            }
            .boxed()
        }
        fn unload(&self, name: String, forget: bool) -> BoxFuture<'static, client::Result<()>> {
            let me = self.clone();
            async move {
                if forget {
                    me.registered.lock().unwrap().remove(&name);
                }
                me.log.lock().unwrap().push(format!("unload {name}{}", if forget { " forget" } else { "" }));
                Ok(())
            }
            .boxed()
        }
        fn list(&self) -> BoxFuture<'static, client::Result<Vec<pb::AdapterInfo>>> {
            self.lists.fetch_add(1, Ordering::SeqCst);
            let mut names: HashSet<String> = self.registered.lock().unwrap().iter().cloned().collect();
            names.extend(SOURCE.iter().map(|s| s.to_string()));
            async move { Ok(names.into_iter().map(|name| pb::AdapterInfo { name, ..Default::default() }).collect()) }.boxed()
        }
    }

    fn manager(capacity: usize) -> (Adapters, Arc<FakeShards>) {
        let fake = Arc::new(FakeShards::default());
        (Adapters::new(Arc::new(fake.clone()), capacity), fake)
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_load() {
        let (m, fake) = manager(2);
        let leases = futures::future::join_all((0..5).map(|_| m.acquire("slow-a"))).await;
        assert!(leases.iter().all(|l| l.is_ok()));
        assert_eq!(fake.loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_slow_load_does_not_hold_up_a_resident_adapter() {
        let (m, _) = manager(2);
        drop(m.acquire("a").await.unwrap());
        let slow = tokio::spawn({
            let m = m.clone();
            async move { m.acquire("slow-b").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        let _a = m.acquire("a").await.unwrap();
        assert!(t0.elapsed() < Duration::from_millis(50), "a resident adapter waited {:?}", t0.elapsed());
        slow.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn full_pool_evicts_the_least_recently_used_idle_adapter() {
        let (m, fake) = manager(2);
        drop(m.acquire("a").await.unwrap());
        drop(m.acquire("b").await.unwrap());
        drop(m.acquire("a").await.unwrap()); // b is now least recently used
        let _c = m.acquire("c").await.unwrap();
        assert_eq!(m.resident(), vec!["a", "c"]);
        assert_eq!(fake.log.lock().unwrap().as_slice(), ["load a", "load b", "unload b", "load c"]);
    }

    #[tokio::test]
    async fn busy_pool_waits_for_a_release() {
        let (m, _) = manager(1);
        let a = m.acquire("a").await.unwrap();
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.acquire("b").await.map(|l| l.name().to_string()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "b must wait while a is in use");
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap().unwrap();
        assert_eq!(got, "b");
        assert_eq!(m.resident(), vec!["b"]);
    }

    #[tokio::test]
    async fn failed_load_fails_its_waiters_and_frees_its_entry() {
        let (m, _) = manager(1);
        let e = m.acquire("missing-x").await.err().unwrap();
        assert!(matches!(e, InferError::Shard { code: pb::ErrorCode::AdapterNotFound, .. }));
        assert!(m.resident().is_empty());
        m.acquire("a").await.unwrap();
    }

    #[tokio::test]
    async fn unload_refuses_new_requests_and_waits_for_running_ones() {
        let (m, fake) = manager(2);
        m.register("a", Some("a".into())).await.unwrap();
        let lease = m.acquire("a").await.unwrap();
        m.unregister("a").await.unwrap();
        assert!(matches!(m.acquire("a").await, Err(InferError::Shard { code: pb::ErrorCode::AdapterNotFound, .. })));
        assert!(!fake.log.lock().unwrap().iter().any(|l| l.starts_with("unload")), "still in use");
        drop(lease);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(fake.log.lock().unwrap().iter().any(|l| l == "unload a forget"));
        assert!(!m.list().await.unwrap().iter().any(|a| a.name == "a"));
        assert!(matches!(m.unregister("a").await, Err(None)));
        m.register("a", Some("a".into())).await.unwrap(); // registering again lifts the refusal
        m.acquire("a").await.unwrap();
    }

    #[tokio::test]
    async fn unknown_names_are_refused_without_an_entry_or_an_eviction() {
        let (m, fake) = manager(1);
        drop(m.acquire("a").await.unwrap());
        let lists = fake.lists.load(Ordering::SeqCst);
        for i in 0..3 {
            let e = m.acquire(&format!("nope-{i}")).await.err().unwrap();
            assert!(matches!(e, InferError::Shard { code: pb::ErrorCode::AdapterNotFound, .. }), "{e}");
        }
        assert_eq!(fake.lists.load(Ordering::SeqCst), lists + 3, "each new name asks the shards once");
        assert_eq!(m.resident(), vec!["a"], "nothing evicted for a name that does not exist");
        assert_eq!(fake.log.lock().unwrap().as_slice(), ["load a"]);
        drop(m.acquire("a").await.unwrap()); // known names ask nobody
        assert_eq!(fake.lists.load(Ordering::SeqCst), lists + 3);
    }

    #[tokio::test]
    async fn dropped_waiter_releases_its_hold() {
        let (m, _) = manager(1);
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.acquire("slow-a").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort(); // the client went away mid-load
        tokio::time::sleep(Duration::from_millis(300)).await;
        // slow-a finished loading and is idle: b can evict it without waiting.
        tokio::time::timeout(Duration::from_secs(1), m.acquire("b")).await.unwrap().unwrap();
    }
}
