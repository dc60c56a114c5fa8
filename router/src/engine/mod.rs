//! The engine: the continuous batching loop and what it owns (the waiting queue, the KV blocks
//! and their prefix cache), and which LoRA adapters are resident on the shards.

pub mod adapters;
pub mod kv;
pub mod queue;
pub mod request;
pub mod scheduler;
