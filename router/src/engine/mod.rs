//! The engine: the continuous batching loop and what it owns (the waiting queue, the KV blocks
//! and their prefix cache), structured output's grammars (a matcher per constrained request,
//! advanced with its tokens), and which LoRA adapters are resident on the shards.

pub mod adapters;
pub mod grammar;
pub mod kv;
pub mod queue;
pub mod request;
pub mod scheduler;
