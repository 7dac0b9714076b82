# One image, both binaries. Build: docker build -t firstcome .
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
EXPOSE 8080
CMD ["firstcome-ingress"]
