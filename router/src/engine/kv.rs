//! The KV block allocator and the prefix cache: a plain struct (`Blocks`) behind a mutex that the
//! batching loop calls synchronously (matching, allocation and growth happen in the loop's step,
//! never awaited); `/info` reads its stats. A `BlockAllocation` gives its blocks back when
//! dropped, so no path can leak them.
//!
//! Prefix cache: a full block whose keys/values are known (a prompt's, once prefilled; a finished
//! request's prompt and generated tokens) can be *published* under a hash chain over its tokens,
//! rooted in the request's prefix key (the LoRA adapter and its load: different adapters, or one
//! adapter reloaded, never share blocks). A later request's allocation looks its prompt up block
//! by block and takes the matching blocks by reference instead of fresh ones; its prefill then
//! computes only the rest (always at least one token). Matches are exact: each cached block keeps
//! its tokens, its parent's hash and its key, all compared. Blocks are reference counted; a
//! published block nobody holds stays cached (its contents intact) until free blocks run out,
//! then the least recently released goes first (a request's last blocks before its first).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use std::sync::{Mutex, MutexGuard};

/// What a request's prompt may be matched against (and published under).
#[derive(Debug, Clone)]
pub struct Prefix {
    /// Who may share: "" for the base model, else the adapter and its load (`AdapterLease::cache_key`).
    pub key: Arc<str>,
    /// The prompt's tokens.
    pub tokens: Arc<Vec<u32>>,
    /// Look the prompt up (false: allocate fresh blocks, e.g. prompt logprobs need every token computed).
    pub lookup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// Blocks an allocation can take: never used, or cached and held by nobody.
    pub free: u32,
    /// Of those, the ones holding a cached prefix.
    pub cached: u32,
    pub total: u32,
}

type Shared = Arc<Mutex<Blocks>>;

fn lock(b: &Shared) -> MutexGuard<'_, Blocks> {
    // A panic while holding the lock leaves the bookkeeping as it was between two whole calls.
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// The blocks, shared by the batching loop, the allocations (which free on drop) and `/info`.
#[derive(Clone)]
pub struct BlockAllocator {
    blocks: Shared,
    block_size: u32,
}

/// Blocks held by one request, in position order. The first `cached_tokens / block_size` came
/// from the prefix cache.
pub struct BlockAllocation {
    pub blocks: Vec<u32>,
    /// Leading prompt tokens whose keys/values are already in the blocks.
    pub cached_tokens: u32,
    block_size: u32,
    owner: Shared,
}

impl std::fmt::Debug for BlockAllocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockAllocation").field("blocks", &self.blocks).field("cached_tokens", &self.cached_tokens).finish()
    }
}

impl BlockAllocation {
    /// Cache location (block * block_size + offset) of each position in `span`.
    pub fn cache_locs(&self, span: std::ops::Range<u32>) -> Vec<u32> {
        span.map(|p| self.blocks[(p / self.block_size) as usize] * self.block_size + p % self.block_size).collect()
    }

    /// Whether the blocks already hold `tokens` positions.
    pub fn holds(&self, tokens: u32) -> bool {
        tokens.div_ceil(self.block_size) as usize <= self.blocks.len()
    }

    /// Grows the allocation to hold `tokens` positions (KV allocated as the sequence grows);
    /// returns the blocks added (none when it already does), or None when they do not fit now.
    pub fn grow(&mut self, tokens: u32) -> Option<Vec<u32>> {
        if self.holds(tokens) {
            return Some(vec![]);
        }
        let blocks = tokens.div_ceil(self.block_size) - self.blocks.len() as u32;
        let (added, _) = lock(&self.owner).allocate_keeping(blocks, None, 0)?;
        self.blocks.extend(&added);
        Some(added)
    }

    /// Offers the full blocks among the first `valid` positions (whose keys/values are computed)
    /// to the prefix cache under `key`; `tokens` covers at least those positions.
    pub fn publish(&self, key: &Arc<str>, tokens: &[u32], valid: u32) {
        let full = (valid.min(tokens.len() as u32) / self.block_size) as usize;
        let full = full.min(self.blocks.len());
        if full == 0 {
            return;
        }
        let n = full * self.block_size as usize;
        lock(&self.owner).publish(key.clone(), &tokens[..n], &self.blocks[..full]);
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        lock(&self.owner).release(std::mem::take(&mut self.blocks));
    }
}

impl BlockAllocator {
    pub fn new(num_blocks: u32, block_size: u32) -> Self {
        let blocks = Blocks::new(num_blocks, block_size);
        blocks.gauges();
        Self { blocks: Arc::new(Mutex::new(blocks)), block_size }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks for `tokens` tokens, or None if they do not fit now.
    #[cfg(test)]
    pub fn allocate(&self, tokens: u32) -> Option<BlockAllocation> {
        self.allocate_for(tokens, None, 0)
    }

    /// Blocks for `tokens` tokens, the prompt's cached prefix (if any) among them; None if they
    /// do not fit now with `reserve` blocks left over for the running requests to grow into
    /// (nothing is taken then).
    pub fn allocate_for(&self, tokens: u32, prefix: Option<Prefix>, reserve: u32) -> Option<BlockAllocation> {
        let (blocks, hits) = lock(&self.blocks).allocate_keeping(tokens.div_ceil(self.block_size), prefix.as_ref(), reserve)?;
        Some(BlockAllocation { blocks, cached_tokens: hits * self.block_size, block_size: self.block_size, owner: self.blocks.clone() })
    }

    pub fn stats(&self) -> BlockStats {
        lock(&self.blocks).stats()
    }
}

/// A published block: what it holds, to verify a match exactly.
struct CachedBlock {
    hash: u64,
    parent: u64,
    key: Arc<str>,
    tokens: Box<[u32]>,
}

struct Blocks {
    block_size: usize,
    total: u32,
    /// Never-used (or evicted) blocks; lowest ids are handed out first.
    free: Vec<u32>,
    /// Holders per block.
    refs: Vec<u32>,
    /// Published blocks by content hash, and what each holds.
    by_hash: HashMap<u64, u32>,
    cached: HashMap<u32, CachedBlock>,
    /// Published blocks nobody holds, by release order (evicted first to last).
    idle: BTreeMap<u64, u32>,
    idle_at: HashMap<u32, u64>,
    tick: u64,
}

fn root_hash(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "tessera-prefix".hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl Blocks {
    fn new(total: u32, block_size: u32) -> Self {
        Self {
            block_size: block_size as usize,
            total,
            free: (0..total).rev().collect(),
            refs: vec![0; total as usize],
            by_hash: HashMap::new(),
            cached: HashMap::new(),
            idle: BTreeMap::new(),
            idle_at: HashMap::new(),
            tick: 0,
        }
    }

    fn stats(&self) -> BlockStats {
        BlockStats { free: (self.free.len() + self.idle.len()) as u32, cached: self.idle.len() as u32, total: self.total }
    }

    fn gauges(&self) {
        let s = self.stats();
        crate::metrics::kv_blocks(s.free, s.cached, s.total);
    }

    /// The cached blocks matching the prompt's leading full blocks, leaving at least one token
    /// to compute.
    fn lookup(&self, p: &Prefix) -> Vec<u32> {
        let mut hits = Vec::new();
        if !p.lookup || p.tokens.is_empty() {
            return hits;
        }
        let full = (p.tokens.len() - 1) / self.block_size;
        let mut parent = root_hash(&p.key);
        for chunk in p.tokens.chunks(self.block_size).take(full) {
            let h = chain_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&h) else { break };
            let c = &self.cached[&b];
            if c.parent != parent || *c.key != *p.key || *c.tokens != *chunk {
                break; // a hash collision: never serve another prefix's keys
            }
            hits.push(b);
            parent = h;
        }
        hits
    }

    #[cfg(test)]
    fn allocate(&mut self, blocks: u32, prefix: Option<&Prefix>) -> Option<(Vec<u32>, u32)> {
        self.allocate_keeping(blocks, prefix, 0)
    }

    /// Like `allocate`, leaving at least `reserve` blocks available afterwards.
    fn allocate_keeping(&mut self, blocks: u32, prefix: Option<&Prefix>, reserve: u32) -> Option<(Vec<u32>, u32)> {
        let mut hits = prefix.map(|p| self.lookup(p)).unwrap_or_default();
        hits.truncate(blocks as usize);
        let fresh = blocks as usize - hits.len();
        let idle_hits = hits.iter().filter(|b| self.idle_at.contains_key(b)).count();
        if fresh + reserve as usize > self.free.len() + self.idle.len() - idle_hits {
            return None;
        }
        for &b in &hits {
            if let Some(t) = self.idle_at.remove(&b) {
                self.idle.remove(&t);
            }
            self.refs[b as usize] += 1;
        }
        let mut out = hits.clone();
        for _ in 0..fresh {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.evict_one(),
            };
            self.refs[b as usize] = 1;
            out.push(b);
        }
        if let Some(p) = prefix.filter(|p| p.lookup) {
            crate::metrics::prefix_lookup(p.tokens.len() as u32, (hits.len() * self.block_size) as u32);
        }
        self.gauges();
        Some((out, hits.len() as u32))
    }

    /// Drops the least recently released cached block from the cache; returns it, now plain.
    fn evict_one(&mut self) -> u32 {
        let (&t, &b) = self.idle.iter().next().expect("allocate checked the idle blocks");
        self.idle.remove(&t);
        self.idle_at.remove(&b);
        if let Some(c) = self.cached.remove(&b) {
            if self.by_hash.get(&c.hash) == Some(&b) {
                self.by_hash.remove(&c.hash);
            }
        }
        crate::metrics::prefix_eviction();
        b
    }

    fn publish(&mut self, key: Arc<str>, tokens: &[u32], blocks: &[u32]) {
        let mut parent = root_hash(&key);
        for (chunk, &b) in tokens.chunks(self.block_size).zip(blocks) {
            let h = chain_hash(parent, chunk);
            if !self.cached.contains_key(&b) && !self.by_hash.contains_key(&h) && self.refs[b as usize] > 0 {
                self.by_hash.insert(h, b);
                self.cached.insert(b, CachedBlock { hash: h, parent, key: key.clone(), tokens: chunk.into() });
            }
            parent = h;
        }
    }

    fn release(&mut self, blocks: Vec<u32>) {
        // Last block first: a request's tail is evicted before its head, which others share more.
        for b in blocks.into_iter().rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "a block was freed twice");
            *r = r.saturating_sub(1);
            if *r > 0 {
                continue;
            }
            if self.cached.contains_key(&b) {
                self.tick += 1;
                self.idle.insert(self.tick, b);
                self.idle_at.insert(b, self.tick);
            } else {
                self.free.push(b);
            }
        }
        self.gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(key: &str, tokens: &[u32]) -> Option<Prefix> {
        Some(Prefix { key: key.into(), tokens: Arc::new(tokens.to_vec()), lookup: true })
    }

    #[test]
    fn allocates_whole_blocks_and_frees_on_drop() {
        let a = BlockAllocator::new(10, 16);
        let x = a.allocate(17).unwrap();
        assert_eq!(x.blocks, vec![0, 1]);
        assert_eq!(a.stats(), BlockStats { free: 8, cached: 0, total: 10 });
        drop(x);
        assert_eq!(a.stats(), BlockStats { free: 10, cached: 0, total: 10 });
    }

    #[test]
    fn refuses_when_full_and_grows_while_blocks_last() {
        let a = BlockAllocator::new(4, 16);
        let mut x = a.allocate(32).unwrap();
        assert!(a.allocate(33).is_none());
        let y = a.allocate(16).unwrap();
        assert_eq!(y.blocks, vec![2]);
        assert_eq!(x.grow(40), Some(vec![3]));
        assert_eq!(x.grow(48), Some(vec![]));
        assert_eq!(x.grow(49), None, "no block left: nothing taken");
        drop(x);
        assert!(a.allocate(48).is_some());
    }

    #[test]
    fn cache_locs_follow_the_block_table() {
        let a = BlockAllocator::new(8, 4);
        let _hold = a.allocate(4).unwrap(); // block 0
        let x = a.allocate(6).unwrap(); // blocks 1, 2
        assert_eq!(x.cache_locs(0..6), vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(x.cache_locs(3..6), vec![7, 8, 9]);
    }

    #[test]
    fn blocks_never_duplicate() {
        let mut l = Blocks::new(3, 4);
        let (a, _) = l.allocate(2, None).unwrap();
        let (b, _) = l.allocate(1, None).unwrap();
        assert!(l.allocate(1, None).is_none());
        let mut all: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        l.release(a);
        l.release(b);
        assert_eq!(l.free.len(), 3);
    }

    #[test]
    fn a_published_prefix_is_shared_by_reference_and_leaves_a_token_to_compute() {
        let mut l = Blocks::new(10, 4);
        let prompt: Vec<u32> = (0..10).collect(); // blocks [0..4) [4..8) + 2 tokens
        let (a, hits) = l.allocate(4, prefix("", &prompt).as_ref()).unwrap();
        assert_eq!(hits, 0);
        l.publish("".into(), &prompt[..8], &a[..2]);
        let (b, hits) = l.allocate(4, prefix("", &prompt).as_ref()).unwrap();
        assert_eq!((hits, &b[..2]), (2, &a[..2]), "the two full prompt blocks are shared");
        assert!(b[2..].iter().all(|x| !a.contains(x)));
        assert_eq!((l.refs[a[0] as usize], l.refs[a[1] as usize]), (2, 2));
        // a prompt of exactly two blocks reuses only the first: its last token must be computed
        let (c, hits) = l.allocate(2, prefix("", &prompt[..8]).as_ref()).unwrap();
        assert_eq!((hits, c[0]), (1, a[0]));
        // a different continuation shares the first block only
        let other: Vec<u32> = [0, 1, 2, 3, 9, 9, 9, 9, 9].to_vec();
        let (d, hits) = l.allocate(3, prefix("", &other).as_ref()).unwrap();
        assert_eq!((hits, d[0]), (1, a[0]));
        for x in [a, b, c, d] {
            l.release(x);
        }
        assert!(l.refs.iter().all(|&r| r == 0), "reference counts return to zero");
        assert_eq!(l.stats(), BlockStats { free: 10, cached: 2, total: 10 });
    }

    #[test]
    fn adapters_never_share_blocks() {
        let mut l = Blocks::new(10, 4);
        let prompt: Vec<u32> = (0..9).collect();
        let (a, _) = l.allocate(3, prefix("lora-a@1", &prompt).as_ref()).unwrap();
        l.publish("lora-a@1".into(), &prompt[..8], &a[..2]);
        for key in ["", "lora-b@2", "lora-a@7"] {
            let (x, hits) = l.allocate(3, prefix(key, &prompt).as_ref()).unwrap();
            assert_eq!(hits, 0, "{key} matched blocks written for lora-a@1");
            l.release(x);
        }
        assert_eq!(l.allocate(3, prefix("lora-a@1", &prompt).as_ref()).unwrap().1, 2);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_only_when_free_ones_run_out_tail_first() {
        let mut l = Blocks::new(4, 4);
        let prompt: Vec<u32> = (0..13).collect();
        let (a, _) = l.allocate(4, prefix("", &prompt).as_ref()).unwrap();
        l.publish("".into(), &prompt[..12], &a[..3]);
        l.release(a.clone());
        assert_eq!(l.stats(), BlockStats { free: 4, cached: 3, total: 4 });
        let (x, hits) = l.allocate(1, None).unwrap(); // the never-published block first
        assert_eq!((hits, x), (0, vec![a[3]]));
        let (y, _) = l.allocate(1, None).unwrap(); // then the cached tail
        assert_eq!(y, vec![a[2]]);
        assert_eq!(l.allocate(4, prefix("", &prompt).as_ref()), None, "cannot fit: nothing taken");
        assert_eq!(l.stats().cached, 2);
        let (z, hits) = l.allocate(2, prefix("", &prompt).as_ref()).unwrap();
        assert_eq!((hits, z), (2, a[..2].to_vec()), "the head is still cached");
    }

    #[test]
    fn a_colliding_hash_never_serves_other_tokens() {
        let mut l = Blocks::new(6, 2);
        let (a, _) = l.allocate(2, None).unwrap();
        l.publish("".into(), &[1, 2], &a[..1]);
        // forge the index: the hash of [3, 4] points at the block holding [1, 2]
        let forged = chain_hash(root_hash(""), &[3, 4]);
        l.by_hash.insert(forged, a[0]);
        let (_, hits) = l.allocate(2, prefix("", &[3, 4, 5]).as_ref()).unwrap();
        assert_eq!(hits, 0);
    }
}
