# keywarden's container image.
#
#   docker build -t keywarden:local .
#   docker run --rm keywarden:local --help
#   docker run --rm -it keywarden:local demo          # the whole story, self-contained
#
# Stages:
#   builder   compiles `keywarden` (release, --locked) with the Rust toolchain;
#   toolchain installs the npm packages pinned by package-lock.json (`npm ci --ignore-scripts`)
#             and keeps the three the demo needs: anvil (a prebuilt binary inside
#             @foundry-rs/anvil-linux-amd64) and the Safe and OpenZeppelin contract artifacts;
#   runtime   Debian slim, no compiler, no Node.js or npm: the binary, those packages under
#             /opt/keywarden/node_modules (KEYWARDEN_NODE_MODULES points the demo there) and
#             anvil on PATH, running as the unprivileged user `keywarden` (uid 10001).
#
# The build context is filtered by .dockerignore and the repository's .git is not sent: pass the
# revision for `keywarden --version` and keywarden_build_info with
#   docker build --build-arg GIT_SHA=$(git rev-parse --short=12 HEAD) -t keywarden:local .
# (without it the revision reads "unknown").
# The anvil package is a linux x86-64 build: build the image for linux/amd64.

ARG RUST_VERSION=1.95
ARG NODE_VERSION=22
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG GIT_SHA=
ENV KEYWARDEN_GIT_SHA=${GIT_SHA}
WORKDIR /build
# Only what the build reads (docs, dashboards and tests do not invalidate this layer).
COPY Cargo.toml Cargo.lock build.rs package.json ./
COPY benches/ benches/
COPY contracts/out/ contracts/out/
COPY migrations/ migrations/
COPY src/ src/
RUN cargo build --release --locked --bin keywarden \
    && install -m 0755 target/release/keywarden /usr/local/bin/keywarden \
    && /usr/local/bin/keywarden --version

FROM node:${NODE_VERSION}-${DEBIAN_RELEASE}-slim AS toolchain
WORKDIR /toolchain
COPY package.json package-lock.json ./
# --ignore-scripts: no package's install script runs; the anvil package ships its binary.
RUN npm ci --ignore-scripts --no-audit --no-fund \
    && mkdir -p /out/node_modules/@foundry-rs /out/node_modules/@safe-global /out/node_modules/@openzeppelin \
    && cp -a node_modules/@foundry-rs/anvil-linux-amd64 /out/node_modules/@foundry-rs/ \
    && cp -a node_modules/@safe-global/safe-contracts /out/node_modules/@safe-global/ \
    && cp -a node_modules/@openzeppelin/contracts /out/node_modules/@openzeppelin/ \
    && test -x /out/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: PCCS and RPC endpoints over HTTPS; curl: container health checks;
# procps: `kill`, with which the demo stops its child processes.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl procps \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 keywarden \
    && useradd --system --uid 10001 --gid keywarden --home-dir /var/lib/keywarden --shell /usr/sbin/nologin keywarden \
    && install -d -m 0700 -o keywarden -g keywarden /var/lib/keywarden \
    && install -d -m 0750 -o keywarden -g keywarden /var/lib/anvil /shared \
    && install -d -m 0755 /etc/keywarden
# /var/lib/keywarden: the data directory (root keys, replica id, SQLite when no PostgreSQL).
# /var/lib/anvil and /shared: mount points of docker-compose.yml's anvil state and of the volume
# its setup service shares with the replicas; named volumes take their owner from these.
COPY --from=builder /usr/local/bin/keywarden /usr/local/bin/keywarden
COPY --from=toolchain /out/node_modules /opt/keywarden/node_modules
RUN ln -s /opt/keywarden/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil /usr/local/bin/anvil \
    && anvil --version >/dev/null \
    && keywarden --version
ENV KEYWARDEN_NODE_MODULES=/opt/keywarden/node_modules \
    KEYWARDEN_STORAGE__DATA_DIR=/var/lib/keywarden
USER 10001:10001
WORKDIR /var/lib/keywarden
# API (KMS RPC, TLS) and the metrics listener (/metrics, /livez, /readyz; bind it to 0.0.0.0
# with metrics.listen to scrape it from outside the container).
EXPOSE 8000 9464
ENTRYPOINT ["keywarden"]
CMD ["serve"]
