# One image, both binaries, running as a non-root user. Build:
#   docker build -t firstcome .
# Run one of them: `firstcome-ingress` (the default) or `firstcome-worker run`
# (also `migrate`, `topics`, `reconcile`, `redis rebuild`, `dlq ...`).
# Not built on the development machines (no Docker engine there); CI lints it
# with hadolint. See deploy/README.md.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source by rdkafka-sys (bundled, not Debian's 2.0).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3 zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p firstcome-ingress -p firstcome-worker

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home firstcome
COPY --from=build /src/target/release/firstcome-ingress /src/target/release/firstcome-worker /usr/local/bin/
USER 10001
# API, and the operations ports of the ingress and the worker (/metrics).
EXPOSE 8080 9090 9091
CMD ["firstcome-ingress"]
