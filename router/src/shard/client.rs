//! gRPC clients for the shards, over unix sockets. `ShardedClient` sends each call to every
//! shard (tensor-parallel ranks step together) and answers with rank 0's reply.

use futures::future::join_all;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::shard::pb;
use crate::shard::pb::text_generation_service_client::TextGenerationServiceClient;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach shard: {0}")]
    Connection(String),
    #[error("shard error {code:?}: {message}")]
    Shard { code: pb::ErrorCode, message: String, request_ids: Vec<u64> },
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        if let Some(raw) = s.metadata().get_bin("tessera-error-bin") {
            if let Ok(bytes) = raw.to_bytes() {
                if let Ok(e) = pb::ShardError::decode(bytes.as_ref()) {
                    let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Internal);
                    return ClientError::Shard { code, message: e.message, request_ids: e.request_ids };
                }
            }
        }
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                ClientError::Connection(s.message().to_string())
            }
            _ => ClientError::Shard { code: pb::ErrorCode::Internal, message: s.message().to_string(), request_ids: vec![] },
        }
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(e: tonic::transport::Error) -> Self {
        ClientError::Connection(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// One shard.
#[derive(Clone)]
pub struct ShardClient {
    stub: TextGenerationServiceClient<Channel>,
}

impl ShardClient {
    pub async fn connect_uds(path: &str) -> Result<Self> {
        let path = path.to_string();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await?;
        let stub = TextGenerationServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024);
        Ok(Self { stub })
    }

    pub async fn info(&mut self) -> Result<pb::InfoResponse> {
        Ok(self.stub.info(pb::InfoRequest {}).await?.into_inner())
    }
    pub async fn health(&mut self) -> Result<()> {
        self.stub.health(pb::HealthRequest {}).await?;
        Ok(())
    }
    pub async fn service_discovery(&mut self) -> Result<Vec<String>> {
        Ok(self.stub.service_discovery(pb::ServiceDiscoveryRequest {}).await?.into_inner().urls)
    }
    pub async fn clear_cache(&mut self, id: Option<u64>) -> Result<()> {
        self.stub.clear_cache(pb::ClearCacheRequest { id }).await?;
        Ok(())
    }
    pub async fn filter_batch(&mut self, batch_id: u64, request_ids: Vec<u64>) -> Result<Option<pb::CachedBatch>> {
        let r = self.stub.filter_batch(pb::FilterBatchRequest { batch_id, request_ids }).await?.into_inner();
        Ok(r.batch.filter(|b| b.size > 0))
    }
    pub async fn warmup(&mut self, req: pb::WarmupRequest) -> Result<u32> {
        Ok(self.stub.warmup(req).await?.into_inner().num_blocks)
    }
    pub async fn step(&mut self, batch_ids: Vec<u64>, grants: Vec<pb::BlockGrant>, prefill: Option<pb::Batch>,
                      masks: Vec<pb::TokenMask>, trace: Option<String>) -> Result<pb::StepResponse> {
        // The shard keeps each batch's rows: a step names the batches only (requests leave by
        // FilterBatch or end on the shard), so the per-step message grows with new prompts (and
        // constrained rows' masks) only.
        let req = traced(pb::StepRequest { batch_ids, grants, prefill, masks }, trace);
        Ok(self.stub.step(req).await?.into_inner())
    }
    pub async fn load_adapter(&mut self, req: pb::LoadAdapterRequest) -> Result<pb::LoadAdapterResponse> {
        Ok(self.stub.load_adapter(req).await?.into_inner())
    }
    pub async fn unload_adapter(&mut self, name: String, forget: bool) -> Result<()> {
        self.stub.unload_adapter(pb::UnloadAdapterRequest { name, forget }).await?;
        Ok(())
    }
    pub async fn list_adapters(&mut self) -> Result<Vec<pb::AdapterInfo>> {
        Ok(self.stub.list_adapters(pb::ListAdaptersRequest {}).await?.into_inner().adapters)
    }
}

/// A request carrying the caller's trace context as W3C `traceparent` metadata.
fn traced<T>(msg: T, trace: Option<String>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(tp) = trace.and_then(|t| t.parse().ok()) {
        req.metadata_mut().insert("traceparent", tp);
    }
    req
}

/// Every shard of the model.
#[derive(Clone)]
pub struct ShardedClient {
    shards: Vec<ShardClient>,
    /// Socket path of each shard, rank order.
    paths: Vec<String>,
}

macro_rules! fan_out {
    ($self:ident, |$c:ident| $call:expr) => {{
        let results = join_all($self.shards.iter_mut().map(|$c| $call)).await;
        let mut first = None;
        for r in results {
            let r = r?;
            first.get_or_insert(r);
        }
        Ok(first.expect("a sharded client has at least one shard"))
    }};
}

impl ShardedClient {
    /// Connects to the shard at `path`, then to every shard it reports.
    pub async fn connect_uds(path: &str) -> Result<Self> {
        let mut first = ShardClient::connect_uds(path).await?;
        let mut urls = first.service_discovery().await?;
        let mut shards = Vec::with_capacity(urls.len().max(1));
        for url in &urls {
            shards.push(ShardClient::connect_uds(url).await?);
        }
        if shards.is_empty() {
            shards.push(first);
            urls.push(path.to_string());
        }
        Ok(Self { shards, paths: urls })
    }

    /// Every shard's Info, with its socket path.
    pub async fn infos(&mut self) -> Result<Vec<(String, pb::InfoResponse)>> {
        let all = join_all(self.shards.iter_mut().map(|c| c.info())).await;
        self.paths.iter().cloned().zip(all).map(|(p, r)| r.map(|i| (p, i))).collect()
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }
    pub async fn info(&mut self) -> Result<pb::InfoResponse> {
        self.shards[0].info().await
    }
    pub async fn health(&mut self) -> Result<()> {
        fan_out!(self, |c| c.health())
    }
    pub async fn clear_cache(&mut self, id: Option<u64>) -> Result<()> {
        fan_out!(self, |c| c.clear_cache(id))
    }
    pub async fn filter_batch(&mut self, batch_id: u64, ids: Vec<u64>) -> Result<Option<pb::CachedBatch>> {
        fan_out!(self, |c| c.filter_batch(batch_id, ids.clone()))
    }
    pub async fn warmup(&mut self, req: pb::WarmupRequest) -> Result<u32> {
        let all = join_all(self.shards.iter_mut().map(|c| c.warmup(req.clone()))).await;
        // Every rank must fit the same cache: take the smallest.
        let mut n = u32::MAX;
        for r in all {
            n = n.min(r?);
        }
        Ok(n)
    }
    pub async fn step(&mut self, batch_ids: Vec<u64>, grants: Vec<pb::BlockGrant>, prefill: Option<pb::Batch>,
                      masks: Vec<pb::TokenMask>, trace: Option<String>) -> Result<pb::StepResponse> {
        fan_out!(self, |c| c.step(batch_ids.clone(), grants.clone(), prefill.clone(), masks.clone(), trace.clone()))
    }
    pub async fn load_adapter(&mut self, req: pb::LoadAdapterRequest) -> Result<pb::LoadAdapterResponse> {
        fan_out!(self, |c| c.load_adapter(req.clone()))
    }
    pub async fn unload_adapter(&mut self, name: String, forget: bool) -> Result<()> {
        fan_out!(self, |c| c.unload_adapter(name.clone(), forget))
    }
    pub async fn list_adapters(&mut self) -> Result<Vec<pb::AdapterInfo>> {
        self.shards[0].list_adapters().await
    }
}
