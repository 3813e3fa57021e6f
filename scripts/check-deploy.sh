#!/usr/bin/env bash
# check-deploy.sh [--no-docker]
#
# The deployment checks that need helm, kubeconform and a Docker engine. None of them can be
# installed on the project's machines, where the tests check the chart and the image statically
# (docs/deployment.md). Run this where they exist, on a workstation or in an external CI, after
# `npm ci && npm run build`:
#   1. helm lint --strict, with the defaults and with each helm/normserve/ci/*-values.yaml;
#   2. helm template | kubeconform -strict, and the same output compared with the manifests the
#      tests render (test/fixtures/chart/<name>.yaml), so that helm confirms the subset renderer;
#   3. the chart's own refusals (a grace period shorter than the drain);
#   4. docker build, then the container on a read-only root must become healthy and stop with 0.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

chart=helm/normserve
kube_version=1.30.0
log() { printf '[check-deploy] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { log "$1 is not installed: $2"; exit 2; }; }
need helm 'https://helm.sh/docs/intro/install/'
need kubeconform 'https://github.com/yannh/kubeconform'
test -f dist/scripts/chart/compare.js || { log 'run npm ci && npm run build first'; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log "helm lint --strict (defaults)"
helm lint --strict "$chart"
for values in "$chart"/ci/*-values.yaml; do
  name=$(basename "$values" -values.yaml)
  log "$name: helm lint, helm template | kubeconform, compare with test/fixtures/chart/$name.yaml"
  helm lint --strict "$chart" -f "$values"
  helm template normserve "$chart" --namespace ml --kube-version "$kube_version" -f "$values" >"$tmp/$name.yaml"
  kubeconform -strict -summary -kubernetes-version "$kube_version" \
    -schema-location default \
    -schema-location 'https://raw.githubusercontent.com/datreeio/CRDs-catalog/main/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json' \
    "$tmp/$name.yaml"
  node dist/scripts/chart/compare.js "$tmp/$name.yaml" "test/fixtures/chart/$name.yaml"
done

log "the chart refuses a grace period shorter than the drain"
if helm template normserve "$chart" --set terminationGracePeriodSeconds=5 >/dev/null 2>"$tmp/err"; then
  log 'helm template accepted terminationGracePeriodSeconds=5'; exit 1
fi
grep -q 'terminationGracePeriodSeconds (5 s) must exceed' "$tmp/err"

if [ "${1:-}" = --no-docker ]; then log "done (without Docker)"; exit 0; fi
need docker 'https://docs.docker.com/engine/install/'
log "docker build"
docker build -t normserve:check .
log "docker run on a read-only root; waiting for healthy"
docker volume create normserve-check >/dev/null
cid=$(docker run -d --read-only --tmpfs /tmp -v normserve-check:/data normserve:check)
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true; docker volume rm normserve-check >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
for _ in $(seq 1 60); do
  status=$(docker inspect --format '{{.State.Health.Status}}' "$cid")
  [ "$status" = healthy ] && break
  sleep 2
done
[ "$status" = healthy ] || { docker logs "$cid" >&2; log "not healthy: $status"; exit 1; }
docker stop -t 30 "$cid" >/dev/null
code=$(docker inspect --format '{{.State.ExitCode}}' "$cid")
[ "$code" = 0 ] || { docker logs "$cid" >&2; log "exit code $code after SIGTERM"; exit 1; }
log "done"
