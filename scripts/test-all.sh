#!/usr/bin/env bash
# Installs everything the test suite needs on Debian 12 and runs every test, on every compute
# backend: webasm, cpu and the float64 reference need nothing; webgpu needs lavapipe from
# bookworm-backports (unpacked privately under .cache/lavapipe); headlessgl needs the native gl
# build and an X server (Xvfb). Needs root (or sudo) for apt-get. CI runs this (.ci/run).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test-all] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

log "apt-get update"
as_root apt-get update -q >&2
# openssl: the security tests make their own certificates. yamllint: the chart checks. python3: the
# placement test runs the documented owner rule in Python.
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl yamllint python3 >&2
# Xvfb, xauth and the toolchain and X11/GL headers that gl's native build needs.
bash scripts/setup-headlessgl.sh
log "npm ci"
npm ci --no-audit --no-fund
bash scripts/setup-headlessgl.sh --build-gl .
bash scripts/setup-lavapipe.sh .cache/lavapipe >/dev/null
# shellcheck source=/dev/null
. .cache/lavapipe/env.sh

# Every backend must start here: a missing one fails the suite instead of being left out.
export NORMSERVE_REQUIRE_BACKENDS=webgpu,headlessgl,native,webasm,cpu,reference
log "npm test under Xvfb"
xvfb-run -a -s "-screen 0 1280x1024x24 -nolisten tcp" npm test
