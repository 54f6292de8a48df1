# syntax=docker/dockerfile:1.7
#
# dcs-edge image, for edge sites that run containers rather than the .deb.
# Build from the repository root:
#
#   docker build -f docker/edge.Dockerfile -t dcs-edge:dev .
#
# Runs as uid 10001, keeps its SQLite buffer in the volume
# /var/lib/dcs-edge, holds no secret (the agent's certificate and key are
# mounted at run time), and checks itself with /usr/local/bin/dcs-healthcheck
# against the ingest listener's /health.

ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.11-slim
# Where the binaries come from. "cargo" (the default, and what production
# images use) builds them with `cargo build --release` in RUST_IMAGE.
# "host" copies binaries already built on the host from bin/ in the build
# context, for machines that cannot pull a Rust image (docs/DEPLOYMENT.md,
# "Installing at a site without registry access"). Either way the runtime
# stage below is the same.
ARG BINARIES=cargo

FROM ${RUST_IMAGE} AS binaries-cargo
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p dcs-edge --bins \
 && install -D -m 0755 target/release/dcs-edge /out/dcs-edge

FROM scratch AS binaries-host
COPY bin/dcs-edge /out/

# A stage of this file chosen by BINARIES, not an image (nothing to tag).
# hadolint ignore=DL3006
FROM binaries-${BINARIES} AS build

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dcs-edge" \
      org.opencontainers.image.description="DCS edge agent: local ingest, durable SQLite buffer, mutual-TLS forwarder" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 dcs \
 && useradd --system --uid 10001 --gid dcs --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin dcs \
 && install -d -m 0755 /etc/dcs /etc/dcs/tls \
 && install -d -m 0700 -o dcs -g dcs /var/lib/dcs-edge

COPY --from=build /out/dcs-edge /usr/local/bin/dcs-edge
COPY docker/healthcheck.sh /usr/local/bin/dcs-healthcheck
COPY docker/edge.toml /etc/dcs/edge.toml

USER 10001:10001
VOLUME ["/var/lib/dcs-edge"]
EXPOSE 8780
# SIGTERM: batches in flight get retry.shutdown_grace, then the WAL is
# checkpointed. Give `docker stop` at least 15 s (compose: stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/dcs-healthcheck", "8780", "/health"]
ENTRYPOINT ["/usr/local/bin/dcs-edge"]
CMD ["run", "--config", "/etc/dcs/edge.toml"]
