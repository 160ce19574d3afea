# syntax=docker/dockerfile:1
# sockudo: Pusher-compatible WebSocket server.
#   docker build -t sockudo:local .
#   docker run -p 6001:6001 -p 9601:9601 sockudo:local
# (compose/docker-compose.yml builds this file and runs the observability stack around it.)

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/sockudo /out/sockudo

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim
# ca-certificates: TLS to webhooks / OTLP endpoints; curl: the HEALTHCHECK below.
# Debian stable point releases only take fixes, so the packages are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sockudo \
 && useradd --system --uid 10001 --gid sockudo --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin sockudo

COPY --from=builder /out/sockudo /usr/local/bin/sockudo

ENV HOST=0.0.0.0 \
    PORT=6001 \
    METRICS_ENABLED=true \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9601 \
    LOG_FORMAT=json

USER 10001:10001
EXPOSE 6001 9601
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:6001/up"]

ENTRYPOINT ["/usr/local/bin/sockudo"]
