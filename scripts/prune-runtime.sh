#!/bin/sh
# prune-runtime.sh NODE_MODULES BACKEND
#
# Leaves in a production node_modules (npm ci --omit=dev --omit=optional) only what the image's
# compute backend needs. The Dockerfile runs it; test/integration/image.test.ts runs it on the
# same tree the Dockerfile builds, so what it removes is tested here.
#
#   native (default), webasm, cpu: no GPU stack at all. gpu.js stays (webasm and cpu run on it;
#     auto falls back to them), the webgpu package (Dawn's binaries, ~130 MB) goes.
#   webgpu: keeps the webgpu package; the host must give the container a Vulkan driver.
# In every case: better-sqlite3's sources and object files go, its compiled addon stays.
set -eu
modules=${1:?usage: prune-runtime.sh NODE_MODULES BACKEND}
backend=${2:-native}
case "$backend" in
  native | webasm | cpu | auto) rm -rf "$modules/webgpu" ;;
  webgpu) ;;
  *) echo "prune-runtime.sh: unknown backend '$backend' (native, webasm, cpu, auto or webgpu)" >&2; exit 2 ;;
esac
sqlite="$modules/better-sqlite3"
test -f "$sqlite/build/Release/better_sqlite3.node" || { echo "prune-runtime.sh: $sqlite is not built" >&2; exit 1; }
rm -rf "$sqlite/deps" "$sqlite/src" "$sqlite/build/Release/obj" "$sqlite/build/Release/obj.target" "$sqlite/build/Release/.deps" "$sqlite/build/deps"
find "$sqlite/build" -mindepth 1 -maxdepth 1 ! -name Release -exec rm -rf {} +
find "$sqlite/build/Release" -mindepth 1 -maxdepth 1 ! -name better_sqlite3.node -exec rm -rf {} +
