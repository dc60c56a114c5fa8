//! Tessera's router: HTTP front door, validation, queue, KV block allocation and the
//! continuous batching loop that drives the shards over gRPC.

pub mod accept;
pub mod adapters;
pub mod api;
pub mod chat;
pub mod metrics;
pub mod openai;
pub mod args;
pub mod block_allocator;
pub mod client;
pub mod detokenize;
pub mod error;
pub mod health;
pub mod infer;
pub mod logging;
pub mod pb;
pub mod queue;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod validation;
