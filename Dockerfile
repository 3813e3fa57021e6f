# syntax=docker/dockerfile:1
#
# normserve's image: built with dev dependencies, run with production ones only, on distroless
# Node 20 as a non-root user. docs/deployment.md explains the choices; test/integration/image.test.ts
# assembles the runtime stage's files the way this file does and runs the server from them.
#
#   docker build -t normserve:0.1.0 .                           # CPU image: the native backend
#   docker build --build-arg BACKEND=webgpu -t normserve:0.1.0-webgpu .
#
# Pin the base images by digest for reproducible builds, e.g.
#   --build-arg RUNTIME_IMAGE=gcr.io/distroless/nodejs20-debian12:nonroot@sha256:<digest>
# Both images are Debian 12 (glibc 2.36), so the addon built in one loads in the other.
ARG NODE_IMAGE=node:20.20-bookworm-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/nodejs20-debian12:nonroot

# Node, npm 11 (its allowScripts decides which install scripts run: better-sqlite3's only) and
# the compilers better-sqlite3 falls back to when no prebuilt addon can be downloaded.
FROM ${NODE_IMAGE} AS toolchain
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/* \
 && npm install -g npm@11.19.1
WORKDIR /src

# Compile the TypeScript (and the generated proto types) with the dev dependencies.
FROM toolchain AS build
COPY package.json package-lock.json ./
RUN ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY proto ./proto
COPY scripts/gen-types.mjs ./scripts/gen-types.mjs
COPY src ./src
RUN npm run build \
 && mkdir -p /data

# Production dependencies only, pruned to what the chosen backend needs.
FROM toolchain AS prod-deps
ARG BACKEND=native
COPY package.json package-lock.json ./
COPY scripts/prune-runtime.sh ./scripts/prune-runtime.sh
RUN npm ci --omit=dev --omit=optional --no-audit --no-fund \
 && sh scripts/prune-runtime.sh node_modules "${BACKEND}"

FROM ${RUNTIME_IMAGE} AS runtime
ARG BACKEND=native
LABEL org.opencontainers.image.title="normserve" \
      org.opencontainers.image.description="PyTorch-exact BatchNorm modules served over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV NODE_ENV=production \
    NORMSERVE_BACKEND=${BACKEND} \
    NORMSERVE_STORE=sqlite:/data \
    NORMSERVE_PORT=50051 \
    NORMSERVE_HEALTH_PORT=50052 \
    NORMSERVE_METRICS_PORT=9464
WORKDIR /app
COPY package.json ./package.json
COPY --from=prod-deps /src/node_modules ./node_modules
COPY --from=build /src/proto ./proto
COPY --from=build /src/dist/src ./dist/src
# The only writable path: the SQLite database, its WAL and its -shm file.
COPY --from=build --chown=65532:65532 /data /data
VOLUME ["/data"]
# 65532 is distroless's "nonroot".
USER 65532:65532
EXPOSE 50051 50052 9464
# Docker only (Kubernetes uses the chart's gRPC probes): the readiness of the module API, asked
# through grpc.health.v1 on the plaintext health port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/nodejs/bin/node", "dist/src/cli/healthcheck.js"]
# Node runs as PID 1 and handles SIGTERM and SIGINT itself: it drains, then exits 0.
ENTRYPOINT ["/nodejs/bin/node"]
CMD ["dist/src/main.js"]
