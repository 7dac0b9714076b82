# One image, both binaries, running as a non-root user, built with the
# `otel` feature (OTLP export of traces stays off until
# OTEL_EXPORTER_OTLP_ENDPOINT is set). Build:
#   docker build -t firstcome .
# Run one of them: `firstcome-ingress` (the default) or `firstcome-worker run`
# (also `migrate`, `topics`, `reconcile`, `redis rebuild`, `dlq ...`).
# Not built on the development machines (no Docker engine there); CI lints it
# with hadolint. See deploy/README.md.
#
# The dependencies are their own layer (cargo-chef): a change to firstcome's
# code rebuilds firstcome, not librdkafka and the 300 crates under it.
FROM rust:1.95-trixie AS chef
# librdkafka is built from source by rdkafka-sys (bundled, not Debian's).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3 zlib1g-dev \
 && rm -rf /var/lib/apt/lists/* \
 && cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json \
      -p firstcome-ingress -p firstcome-worker --features firstcome/otel
COPY . .
RUN cargo build --release --locked -p firstcome-ingress -p firstcome-worker \
      --features firstcome/otel

FROM debian:trixie-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home firstcome
COPY --from=build /src/target/release/firstcome-ingress /src/target/release/firstcome-worker /usr/local/bin/
USER 10001
# API, and the operations ports of the ingress and the worker (/metrics).
EXPOSE 8080 9090 9091
CMD ["firstcome-ingress"]
