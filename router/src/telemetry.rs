//! OpenTelemetry traces (OTLP over HTTP). One span per request; one span per prefill/decode
//! call, child of the first request it serves and linked to all of them; its context goes to
//! the shards as a W3C `traceparent` in the gRPC metadata, where the shard's spans continue it.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry::trace::{Link, SpanContext, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::sync::OnceLock;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Starts exporting to `endpoint` (e.g. http://collector:4318). Keep the provider alive; shut
/// it down at exit to flush.
pub fn init(endpoint: &str, service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(Duration::from_millis(500)).build())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(Resource::builder().with_service_name(service.to_string()).build())
        .build();
    let _ = TRACER.set(provider.tracer("tessera-router"));
    Ok(provider)
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// A request's span; ends when dropped.
pub struct RequestSpan {
    cx: Context,
}

impl RequestSpan {
    pub fn start(input_tokens: u32, max_new_tokens: u32) -> Option<Self> {
        let t = tracer()?;
        let span = t
            .span_builder("request")
            .with_attributes(vec![
                KeyValue::new("input_tokens", input_tokens as i64),
                KeyValue::new("max_new_tokens", max_new_tokens as i64),
            ])
            .start(t);
        Some(Self { cx: Context::current_with_span(span) })
    }

    pub fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    pub fn finish(&self, generated_tokens: u32, outcome: &str) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("generated_tokens", generated_tokens as i64));
        span.set_attribute(KeyValue::new("outcome", outcome.to_string()));
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// The span of one shard call serving `requests`; returns it (ends on drop) and the
/// `traceparent` to send.
pub fn batch_span<'a>(name: &'static str, requests: impl Iterator<Item = &'a SpanContext>) -> Option<(Context, String)> {
    let t = tracer()?;
    let contexts: Vec<SpanContext> = requests.filter(|c| c.is_valid()).cloned().collect();
    let parent = contexts.first().map(|c| Context::new().with_remote_span_context(c.clone())).unwrap_or_default();
    let links = contexts.iter().map(|c| Link::with_context(c.clone())).collect();
    let span = t
        .span_builder(name)
        .with_links(links)
        .with_attributes(vec![KeyValue::new("batch_size", contexts.len() as i64)])
        .start_with_context(t, &parent);
    let cx = Context::current_with_span(span);
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let traceparent = carrier.remove("traceparent")?;
    Some((cx, traceparent))
}
