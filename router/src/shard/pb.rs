//! Generated protobuf/gRPC types of the router <-> shard contract.
#![allow(clippy::all, missing_docs)]
tonic::include_proto!("tessera.v2");
