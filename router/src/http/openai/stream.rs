//! OpenAI streaming: each choice's token events become text pieces (stop sequences held back
//! and cut), and the pieces of all choices become one SSE body of chunks ending in `[DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::StreamExt;

use super::types::Usage;
use super::usage;
use crate::api::{FinishReason, Token};
use crate::infer::detokenize::StopTrimmer;
use crate::error::{ErrorKind, InferError};
use crate::infer::InferStreamEvent;

/// A piece of one choice's stream: text ready to send (stop sequences held back and cut).
pub(super) struct ChoicePiece {
    pub index: u32,
    pub text: String,
    pub tokens: Vec<Token>,
    pub tops: Vec<Vec<Token>>,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: u32,
    pub generated: u32,
    /// Prompt tokens served from the prefix cache (known at the end).
    pub cached: u32,
}

pub(super) fn openai_choice_stream(
    st: crate::infer::ResponseStream,
    index: u32,
    stops: Vec<String>,
    echo: Option<String>,
    prompt_tokens: u32,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<ChoicePiece, InferError>> + Send>> {
    Box::pin(async_stream::stream! {
        let mut trimmer = StopTrimmer::new(stops);
        let mut first = true;
        let mut generated = 0u32;
        futures::pin_mut!(st);
        while let Some(ev) = st.next().await {
            let (token, tops, end) = match ev {
                Err(e) => { yield Err(e); return; }
                Ok(InferStreamEvent::Token { token, top_tokens }) => (token, top_tokens, None),
                Ok(InferStreamEvent::End { token, top_tokens, details, .. }) => (token, top_tokens, Some(details)),
            };
            generated += 1;
            let mut text = if token.special { String::new() } else { trimmer.push(&token.text) };
            if first {
                if let Some(e) = &echo { text = format!("{e}{text}"); }
                first = false;
            }
            let finish = end.as_ref().map(|d| d.finish_reason);
            let cached = end.as_ref().map_or(0, |d| d.cached_tokens);
            if finish.is_some() {
                text.push_str(&trimmer.finish());
            }
            let tops = if tops.is_empty() { vec![] } else { vec![tops] };
            yield Ok(ChoicePiece { index, text, tokens: vec![token], tops, finish, prompt_tokens, generated, cached });
            if finish.is_some() { return; }
        }
    })
}

/// The SSE body of an OpenAI stream: `first` chunks, a chunk per piece (`to_chunk` may hold a
/// piece back: None), the usage chunk if
/// asked for (prompt tokens counted once per prompt, i.e. per `n` choices), then `[DONE]`.
pub(super) fn sse_response<P, F, U>(first: Vec<serde_json::Value>, pieces: P, mut to_chunk: F, usage_chunk: Option<U>, n: u32) -> Response
where
    P: futures::Stream<Item = Result<ChoicePiece, InferError>> + Send + 'static,
    F: FnMut(ChoicePiece) -> Option<serde_json::Value> + Send + 'static,
    U: Fn(Usage) -> serde_json::Value + Send + 'static,
{
    let events = async_stream::stream! {
        for c in first {
            yield Ok::<_, Infallible>(Event::default().json_data(c).unwrap_or_default());
        }
        let mut prompt = std::collections::HashMap::new();
        let mut cached = std::collections::HashMap::new();
        let mut generated = std::collections::HashMap::new();
        futures::pin_mut!(pieces);
        while let Some(piece) = pieces.next().await {
            match piece {
                Ok(p) => {
                    if p.index % n.max(1) == 0 {
                        prompt.insert(p.index, p.prompt_tokens);
                        if p.finish.is_some() {
                            cached.insert(p.index, p.cached);
                        }
                    }
                    generated.insert(p.index, p.generated);
                    if let Some(chunk) = to_chunk(p) {
                        yield Ok(Event::default().json_data(chunk).unwrap_or_default());
                    }
                }
                Err(e) => yield Ok(Event::default().json_data(e.body().openai(e.status())).unwrap_or_default()),
            }
        }
        if let Some(make) = usage_chunk {
            let u = usage(prompt.values().sum(), generated.values().sum(), cached.values().sum());
            yield Ok(Event::default().json_data(make(u)).unwrap_or_default());
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

