# syntax=docker/dockerfile:1
#
# conveyor's container image: the `conveyor` binary on a distroless base,
# running as a non-root user. Build from the repository's top level:
#
#   docker build -t conveyor:dev .
#
# librdkafka (with OpenSSL, rdkafka's `ssl-vendored` feature) and zlib are
# linked statically into the binary, so the runtime stage needs only glibc
# and libgcc (gcr.io/distroless/cc). Expect an image of roughly 40-50 MB
# (the binary ~25-30 MB in release; distroless/cc ~20 MB). Not built on the
# project's machines (they have no container engine): linted with hadolint
# in CI, see deploy/README.md.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# cargo-auditable embeds the dependency list (crate names and versions) in
# the binary, where scanners (cargo audit bin, Trivy, Grype, Syft) read it.
ARG CARGO_AUDITABLE_VERSION=0.7.4
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo install --locked "cargo-auditable@${CARGO_AUDITABLE_VERSION}"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
# Dependencies are cached across builds by BuildKit cache mounts (the
# registry, and target/ with every compiled dependency), not by image
# layers: a source change recompiles conveyor alone. librdkafka's
# configure and OpenSSL's build need perl and make, which the rust image
# has; zlib is built in statically (the `static-zlib` feature), zstd by
# rdkafka's `zstd` feature.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo auditable build --release --locked --features static-zlib --bin conveyor \
    && cp target/release/conveyor /conveyor
# The gateway's status store directory (gateway.store_path), owned by the
# runtime user so that a fresh named volume mounted there is writable.
RUN mkdir /conveyor-store

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
# Where the source is (the repository's URL): --build-arg SOURCE=…
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="conveyor" \
      org.opencontainers.image.description="Asynchronous task processing and workflows on Apache Kafka" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
COPY --from=build /conveyor /usr/local/bin/conveyor
COPY conveyor.example.toml /etc/conveyor/conveyor.example.toml
COPY --from=build --chown=65532:65532 /conveyor-store /var/lib/conveyor
# distroless's `nonroot` user (65532); no shell in the image.
USER 65532:65532
# Metrics and probes (metrics.listen) and the gateway (gateway.listen).
EXPOSE 9464 8080
ENTRYPOINT ["/usr/local/bin/conveyor"]
CMD ["worker", "--config", "/etc/conveyor/conveyor.toml"]
