//! W3C Trace Context and OpenTelemetry spans: the gateway is one span of the request's trace.
//!
//! A client's `traceparent` (and `tracestate`) makes the gateway's span its child; without one
//! the gateway starts a trace. The upstream gets a `traceparent` naming the gateway's span, so
//! its own spans hang under it. Whether a trace is recorded follows the client's sampled flag,
//! else `sample_ratio` (parent-based sampling). Spans leave in batches over OTLP/HTTP
//! (protobuf) from a thread of their own, through a bounded queue: a slow or absent collector
//! never holds a request, and spans beyond the queue are dropped.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

/// `[tracing]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// Where spans are posted (OTLP/HTTP, protobuf): `http://collector:4318/v1/traces`.
    pub endpoint: String,
    /// Share of the traces the gateway starts that are recorded (0 to 1).
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Spans waiting for export at most; more are dropped.
    pub queue_size: usize,
    /// Longest wait for one export.
    pub timeout: Duration,
}

/// The process's tracer provider, kept to flush it at exit.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Spans for the requests of this process.
pub struct Tracing {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// The exporter and its batch thread for `settings` (nothing is sent before a span ends).
    pub fn new(settings: &TraceSettings) -> Result<Tracing, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint: {e}"))?;
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(settings.queue_size)
            .with_max_export_batch_size(settings.queue_size.min(512))
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("get2dial-gateway");
        let _ = PROVIDER.set(provider);
        Ok(Tracing {
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The gateway's span of a request that arrived with `headers` at `start`: the child of
    /// the client's `traceparent` when it sent a valid one, else the root of a new trace.
    pub fn start(&self, headers: &http::HeaderMap, method: &str, start: SystemTime) -> Span {
        let parent = self
            .propagator
            .extract(&opentelemetry_http::HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(format!("{method} gateway"))
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .start_with_context(&self.tracer, &parent);
        let context = span.span_context().clone();
        Span {
            cx: Context::new().with_span(span),
            context,
        }
    }
}

/// One request's span.
pub struct Span {
    cx: Context,
    context: SpanContext,
}

impl Span {
    fn context(&self) -> &SpanContext {
        &self.context
    }

    /// The trace id, 32 hex digits (for the access log).
    pub fn trace_id(&self) -> String {
        self.context().trace_id().to_string()
    }

    /// The `traceparent` for the upstream: this span as the parent.
    pub fn traceparent(&self) -> String {
        let c = self.context();
        format!(
            "00-{}-{}-{:02x}",
            c.trace_id(),
            c.span_id(),
            c.trace_flags().to_u8()
        )
    }

    /// The `tracestate` to pass on, if any.
    pub fn tracestate(&self) -> Option<String> {
        let state = self.context().trace_state().header();
        (!state.is_empty()).then_some(state)
    }

    /// Whether the span is recorded (sampled).
    pub fn recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    /// Ends the span at `end` with what became of the request; `failed` marks it an error.
    pub fn end(self, attributes: Vec<KeyValue>, failed: Option<String>, end: SystemTime) {
        let span = self.cx.span();
        span.set_attributes(attributes);
        if let Some(why) = failed {
            span.set_status(Status::error(why));
        }
        span.end_with_timestamp(end);
    }
}

/// Sends the spans still queued (at shutdown).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}
