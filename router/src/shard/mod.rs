//! The shards: their protocol (generated from proto/v2) and gRPC clients over unix sockets.

pub mod client;
pub mod pb;
