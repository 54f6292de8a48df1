# syntax=docker/dockerfile:1.7
#
# dcs-aggregator (and dcs-certs) image. Build from the repository root:
#
#   docker build -f docker/aggregator.Dockerfile -t dcs-aggregator:dev .
#
# Runs as uid 10001 without a shell login, holds no secret (the database URL
# and the TLS files are given at run time), and checks itself with
# /usr/local/bin/dcs-healthcheck against the admin listener's /health.
# Base images are pinned to exact versions; Dependabot proposes updates.

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
# The caches keep the crate downloads and the target directory between
# builds; the binaries are copied out because the cache is not in the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p dcs-aggregator -p dcs-certs --bins \
 && install -D -m 0755 target/release/dcs-aggregator /out/dcs-aggregator \
 && install -D -m 0755 target/release/dcs-certs /out/dcs-certs

FROM scratch AS binaries-host
COPY bin/dcs-aggregator bin/dcs-certs /out/

# A stage of this file chosen by BINARIES, not an image (nothing to tag).
# hadolint ignore=DL3006
FROM binaries-${BINARIES} AS build

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dcs-aggregator" \
      org.opencontainers.image.description="DCS aggregator: mutual-TLS batch endpoint writing to PostgreSQL exactly once" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# /var/lib/dcs-certs belongs to the service user so that an empty named
# volume mounted there (the compose stack's dev certificates) is writable.
RUN groupadd --system --gid 10001 dcs \
 && useradd --system --uid 10001 --gid dcs --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin dcs \
 && install -d -m 0755 /etc/dcs /etc/dcs/tls \
 && install -d -m 0700 -o dcs -g dcs /run/dcs /run/dcs/tls /var/lib/dcs-certs

COPY --from=build /out/dcs-aggregator /out/dcs-certs /usr/local/bin/
COPY docker/healthcheck.sh /usr/local/bin/dcs-healthcheck
COPY docker/aggregator.toml /etc/dcs/aggregator.toml

ENV DCS_AGG_CONFIG=/etc/dcs/aggregator.toml
USER 10001:10001
EXPOSE 8443 9464
# SIGTERM drains (docs/OPERATIONS.md, "Rolling upgrade"): give the container
# at least shutdown.drain_delay + shutdown.grace (35 s by default) to stop.
# An image cannot raise the descriptor limit: run it with --ulimit
# nofile=65536 (compose and the ECS task definition do).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/dcs-healthcheck", "9464", "/health"]
ENTRYPOINT ["/usr/local/bin/dcs-aggregator"]
CMD ["serve"]
