//! Logging set-up for the binaries: `RUST_LOG` filters (default `info`),
//! text for people or JSON lines for log shippers.
//!
//! With the `otel` cargo feature, the long-running processes
//! ([`init_service`]) also export their spans over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the other `OTEL_*` variables of the
//! OpenTelemetry specification apply too). Without the feature the binaries
//! carry no OpenTelemetry code at all.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber for a one-shot command. Call once, first
/// thing in `main`.
pub fn init(json: bool) {
    let _ = init_service(json, "");
}

/// Installs the global subscriber for `service` (its name in traces). Keep
/// the returned guard until the process ends: dropping it sends the spans
/// still buffered.
#[must_use = "dropping the guard stops the span export"]
pub fn init_service(json: bool, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (fmt_text, fmt_json) = if json {
        (None, Some(tracing_subscriber::fmt::layer().json()))
    } else {
        (Some(tracing_subscriber::fmt::layer()), None)
    };
    let (otel, telemetry) = otel::layer(service);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_text)
        .with(fmt_json)
        .with(otel)
        .init();
    // Settings read under a name that goes away in the next release.
    #[cfg(feature = "cli")]
    for warning in crate::cli::deprecations() {
        tracing::warn!("{warning}");
    }
    telemetry
}

/// Ends the span export when dropped.
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("OpenTelemetry: the last spans were not sent: {e}");
        }
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::Telemetry;

    /// The export layer: OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT`, if set.
    pub(super) fn layer<S>(
        service: &str,
    ) -> (
        Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>,
        Telemetry,
    )
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        if service.is_empty() || std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            return (None, Telemetry { provider: None });
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("OpenTelemetry: no span export ({e})");
                return (None, Telemetry { provider: None });
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("firstcome");
        (
            Some(tracing_opentelemetry::layer().with_tracer(tracer)),
            Telemetry {
                provider: Some(provider),
            },
        )
    }
}

#[cfg(not(feature = "otel"))]
mod otel {
    use super::Telemetry;

    /// No export without the `otel` feature.
    pub(super) fn layer(
        _service: &str,
    ) -> (Option<tracing_subscriber::layer::Identity>, Telemetry) {
        (None, Telemetry {})
    }
}
