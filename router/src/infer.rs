//! The inference front: validate, enqueue, and turn the loop's token events into a response
//! stream (detokenization and stop sequences happen here, per request, off the GPU loop).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::api::{FinishReason, GenerateRequest, Token};
use crate::detokenize::{Detokenizer, StopMatcher};
use crate::error::InferError;
use crate::pb;
use crate::queue::{Entry, Queue, ShardEvent};
use crate::validation::{ValidGenerateRequest, Validation};

/// One event of a response stream.
#[derive(Debug, Clone)]
pub enum InferStreamEvent {
    Token(Token),
    End { token: Token, generated_text: String, details: EndDetails },
}

#[derive(Debug, Clone)]
pub struct EndDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    pub tokens: Vec<Token>,
    pub queued: Instant,
    pub started: Instant,
    pub finished: Instant,
}

/// A whole response, for non-streaming routes.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub generated_text: String,
    pub details: EndDetails,
}

#[derive(Clone)]
pub struct Infer {
    validation: Validation,
    queue: Queue,
    limit: Arc<Semaphore>,
    tokenizer: Arc<Tokenizer>,
    special: Arc<HashSet<u32>>,
}

impl Infer {
    pub fn new(validation: Validation, queue: Queue, tokenizer: Arc<Tokenizer>, max_concurrent: usize) -> Self {
        let special = tokenizer.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        Self { validation, queue, limit: Arc::new(Semaphore::new(max_concurrent)), tokenizer, special: Arc::new(special) }
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Validates and enqueues; the stream holds the concurrency permit until it ends.
    pub async fn generate_stream(
        &self,
        req: GenerateRequest,
    ) -> Result<(Arc<ValidGenerateRequest>, impl Stream<Item = Result<InferStreamEvent, InferError>> + Send + 'static), InferError> {
        let permit = self.limit.clone().try_acquire_owned().map_err(|_| InferError::Overloaded)?;
        let valid = self.validation.validate(req).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = Entry::new(valid, tx);
        let request = entry.request.clone();
        self.queue.append(entry);
        Ok((request.clone(), response_stream(rx, request, self.tokenizer.clone(), self.special.clone(), permit)))
    }

    pub async fn generate(&self, req: GenerateRequest) -> Result<InferResponse, InferError> {
        let (_, stream) = self.generate_stream(req).await?;
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let InferStreamEvent::End { generated_text, details, .. } = ev? {
                return Ok(InferResponse { generated_text, details });
            }
        }
        Err(InferError::Dropped)
    }
}

fn response_stream(
    mut rx: mpsc::UnboundedReceiver<Result<ShardEvent, InferError>>,
    request: Arc<ValidGenerateRequest>,
    tokenizer: Arc<Tokenizer>,
    special: Arc<HashSet<u32>>,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<InferStreamEvent, InferError>> + Send + 'static {
    async_stream::stream! {
        let _permit = permit;
        let mut detok = Detokenizer::new(tokenizer, &request.input_ids);
        let mut stops = StopMatcher::new(request.stopping.stop_sequences.clone());
        let mut tokens: Vec<Token> = Vec::new();
        while let Some(event) = rx.recv().await {
            let ShardEvent::Token { id, logprob, finish, seed, queued, started } = match event {
                Ok(e) => e,
                Err(e) => { yield Err(e); return; }
            };
            let text = detok.push(id);
            let stopped = stops.push(&text);
            let token = Token { id, text, logprob, special: special.contains(&id) };
            tokens.push(token.clone());
            let reason = match finish {
                Some(pb::FinishReason::EosToken) => Some(FinishReason::EosToken),
                _ if stopped => Some(FinishReason::StopSequence),
                Some(_) => Some(FinishReason::Length),
                None => None,
            };
            let Some(finish_reason) = reason else {
                yield Ok(InferStreamEvent::Token(token));
                continue;
            };
            let mut generated_text = detok.generated_text();
            if request.return_full_text {
                generated_text = format!("{}{}", request.inputs, generated_text);
            }
            let details = EndDetails {
                finish_reason,
                generated_tokens: tokens.len() as u32,
                seed: request.report_seed.then_some(seed),
                input_length: request.input_length(),
                tokens,
                queued,
                started,
                finished: Instant::now(),
            };
            yield Ok(InferStreamEvent::End { token, generated_text, details });
            return; // dropping `rx` tells the loop to filter this request out
        }
        yield Err(InferError::Dropped);
    }
}
