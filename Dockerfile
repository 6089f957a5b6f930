# syntax=docker/dockerfile:1
# xpyd: multi-stage build — compile in the Rust image, run from a small Debian image as a
# non-root user. The proxy reads /app/xpyd.yaml and listens on the port that file names: the
# image's own copy of examples/proxy.yaml says 8868; a file mounted over it must say
# `port: 8868` too (or publish and health-check the port it names). No `--port` on the
# command line, which would silently override the file.
#
# io_uring and containers: some runtimes' default seccomp profiles block the io_uring
# syscalls (io_uring_setup, io_uring_enter, io_uring_register) — Docker's since 25.0.
# xpyd then falls back to its epoll driver by itself ("driver: epoll" in the start-up
# line), at some cost in throughput. To keep io_uring, run with a seccomp profile that
# allows those three syscalls (or `--security-opt seccomp=unconfined` where acceptable).
# `--driver epoll` / XPYD_DRIVER=epoll forces the fallback explicitly.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# monoio 0.2.4 with xpyd's io_uring patches, wired by [patch.crates-io] (vendor/README.md).
COPY vendor ./vendor
COPY tools ./tools
COPY benches ./benches
COPY examples ./examples
# PGO=1: the proxy built with profile-guided optimisation (tools/pgo: a short training load
# through simulated nodes, then the build again with its profile; docs/deployment.md). It
# adds the toolchain's llvm-tools (llvm-profdata of its own LLVM) and wrk, and builds twice more.
# It trains on the driver the build container allows: epoll where the builder's seccomp profile
# blocks io_uring, as the container's default profile will at run time.
ARG PGO=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008,DL3015
RUN cargo build --release --locked --bin xpyd --bin xpyd-dummy \
    && if [ "$PGO" = 1 ]; then \
         apt-get update \
         && apt-get install -y --no-install-recommends wrk \
         && rustup component add llvm-tools \
         && tools/pgo --out target/pgo \
         && cp target/pgo/xpyd target/release/xpyd; \
       fi \
    && sed 's/^port: 8000 /port: 8868 /' examples/proxy.yaml > xpyd.yaml \
    && grep -q '^port: 8868 ' xpyd.yaml

FROM debian:bookworm-slim
# curl serves the HEALTHCHECK; versions follow the bookworm point release (not pinned, so
# security updates land on rebuild).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin xpyd \
    && mkdir -p /app \
    && chown xpyd /app
WORKDIR /app
COPY --from=build /src/target/release/xpyd /src/target/release/xpyd-dummy /usr/local/bin/
COPY --from=build --chown=xpyd /src/xpyd.yaml /app/xpyd.yaml
USER 10001
ENV XPYD_CONFIG=/app/xpyd.yaml
EXPOSE 8868
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8868/ping"]
ENTRYPOINT ["xpyd", "proxy", "-c", "/app/xpyd.yaml"]
