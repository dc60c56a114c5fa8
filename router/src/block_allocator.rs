//! The KV block allocator. One task owns the free list; everyone else holds a cheap handle.
//! A `BlockAllocation` gives its blocks back when dropped, so no path can leak them.

use tokio::sync::{mpsc, oneshot};

enum Command {
    Allocate { tokens: u32, reply: oneshot::Sender<Option<Vec<u32>>> },
    Free { blocks: Vec<u32> },
    Stats { reply: oneshot::Sender<BlockStats> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    pub free: u32,
    pub total: u32,
}

/// Handle to the allocator task.
#[derive(Clone)]
pub struct BlockAllocator {
    tx: mpsc::UnboundedSender<Command>,
    block_size: u32,
}

/// Blocks held by one request, in position order.
#[derive(Debug)]
pub struct BlockAllocation {
    pub blocks: Vec<u32>,
    block_size: u32,
    tx: mpsc::UnboundedSender<Command>,
}

impl BlockAllocation {
    /// KV slot of each of the first `n` positions.
    pub fn slots(&self, n: u32) -> Vec<u32> {
        (0..n).map(|p| self.blocks[(p / self.block_size) as usize] * self.block_size + p % self.block_size).collect()
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut self.blocks);
        // The allocator task lives as long as the router; if it is gone, nothing is left to free to.
        let _ = self.tx.send(Command::Free { blocks });
    }
}

impl BlockAllocator {
    pub fn new(num_blocks: u32, block_size: u32) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(FreeList::new(num_blocks), rx));
        Self { tx, block_size }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks for `tokens` tokens, or None if they do not fit now.
    pub async fn allocate(&self, tokens: u32) -> Option<BlockAllocation> {
        let (reply, rx) = oneshot::channel();
        let needed = tokens.div_ceil(self.block_size);
        self.tx.send(Command::Allocate { tokens: needed, reply }).ok()?;
        let blocks = rx.await.ok()??;
        Some(BlockAllocation { blocks, block_size: self.block_size, tx: self.tx.clone() })
    }

    pub async fn stats(&self) -> BlockStats {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Stats { reply }).is_err() {
            return BlockStats { free: 0, total: 0 };
        }
        rx.await.unwrap_or(BlockStats { free: 0, total: 0 })
    }
}

struct FreeList {
    free: Vec<u32>,
    total: u32,
}

impl FreeList {
    fn new(total: u32) -> Self {
        // Lowest ids are handed out first.
        Self { free: (0..total).rev().collect(), total }
    }

    fn allocate(&mut self, blocks: u32) -> Option<Vec<u32>> {
        let n = blocks as usize;
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        let mut out = self.free.split_off(at);
        out.reverse();
        Some(out)
    }

    fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks.into_iter().rev());
        debug_assert!(self.free.len() as u32 <= self.total, "a block was freed twice");
    }
}

async fn run(mut list: FreeList, mut rx: mpsc::UnboundedReceiver<Command>) {
    crate::metrics::kv_blocks(list.free.len() as u32, list.total);
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Allocate { tokens, reply } => {
                if let Some(blocks) = list.allocate(tokens) {
                    if let Err(Some(blocks)) = reply.send(Some(blocks)) {
                        list.release(blocks); // the asker went away
                    }
                    crate::metrics::kv_blocks(list.free.len() as u32, list.total);
                } else {
                    let _ = reply.send(None);
                }
            }
            Command::Free { blocks } => {
                list.release(blocks);
                crate::metrics::kv_blocks(list.free.len() as u32, list.total);
            }
            Command::Stats { reply } => {
                let _ = reply.send(BlockStats { free: list.free.len() as u32, total: list.total });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn allocates_whole_blocks_and_frees_on_drop() {
        let a = BlockAllocator::new(10, 16);
        let x = a.allocate(17).await.unwrap();
        assert_eq!(x.blocks, vec![0, 1]);
        assert_eq!(a.stats().await, BlockStats { free: 8, total: 10 });
        drop(x);
        assert_eq!(a.stats().await, BlockStats { free: 10, total: 10 });
    }

    #[tokio::test]
    async fn refuses_when_full() {
        let a = BlockAllocator::new(4, 16);
        let x = a.allocate(48).await.unwrap();
        assert!(a.allocate(17).await.is_none());
        let y = a.allocate(16).await.unwrap();
        assert_eq!(y.blocks, vec![3]);
        drop(x);
        assert!(a.allocate(48).await.is_some());
    }

    #[tokio::test]
    async fn slots_follow_the_block_table() {
        let a = BlockAllocator::new(8, 4);
        let _hold = a.allocate(4).await.unwrap(); // block 0
        let x = a.allocate(6).await.unwrap(); // blocks 1, 2
        assert_eq!(x.slots(6), vec![4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn free_list_never_duplicates() {
        let mut l = FreeList::new(3);
        let a = l.allocate(2).unwrap();
        let b = l.allocate(1).unwrap();
        assert!(l.allocate(1).is_none());
        let mut all: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        l.release(a);
        l.release(b);
        assert_eq!(l.free.len(), 3);
    }
}
