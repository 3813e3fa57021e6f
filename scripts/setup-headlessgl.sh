#!/usr/bin/env bash
# setup-headlessgl.sh [--build-gl] [--check] [PROJECT_DIR]
#
# Prepares a Debian 12 machine for gpu.js's `headlessgl` backend (npm `gl`,
# an optionalDependency of gpu.js, native build of ANGLE via node-gyp) and
# an X server for it to render into (Xvfb).
#
#   1. apt packages (system-wide, needs root): the node-gyp toolchain and the
#      X11/GL headers that gl@8 needs, Xvfb + xauth (xvfb-run) and Mesa's
#      software GL driver. Skipped when all are installed already.
#   2. --build-gl: in PROJECT_DIR (default: .) make sure node_modules/gl is
#      built, with node-gyp. Nothing is done when `gl` already loads.
#      It forces a source build (no prebuild download from github.com) and
#      points node-gyp at the local Node headers (no download from nodejs.org),
#      so it works with only the npm registry reachable.
#   3. --check: create a 1x1 context under `xvfb-run -a` and print the
#      renderer strings.
#
# npm and install scripts: package.json says "allowScripts": {"gl": false}, so `npm ci` never
# spends minutes compiling ANGLE on machines that do not use headlessgl (servers, images, most
# developers). This script builds gl explicitly, with node-gyp in node_modules/gl, which is what
# gl's own install script would run.
#
# Running tests afterwards:   xvfb-run -a npm test
#   or:  Xvfb :99 -screen 0 1280x1024x24 -nolisten tcp & export DISPLAY=:99
#
# Environment: GL_BUILD_JOBS (default: number of CPUs) -> node-gyp --jobs.
set -Eeuo pipefail

log() { printf '[setup-headlessgl] %s\n' "$*" >&2; }
die() { printf '[setup-headlessgl] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

BUILD_GL=0
CHECK=0
PROJECT=.
for a in "$@"; do
  case "$a" in
    --build-gl) BUILD_GL=1 ;;
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) die "unknown option $a" ;;
    *) PROJECT=$a ;;
  esac
done

PKGS=(
  build-essential python3 pkg-config           # node-gyp toolchain
  libx11-dev libxext-dev libxi-dev             # ANGLE's X11 backend
  libgl1-mesa-dev mesa-common-dev libglu1-mesa-dev libglew-dev
  xvfb xauth                                   # X server + xvfb-run (xauth is only a Recommends of xvfb)
  libgl1-mesa-dri                              # Mesa llvmpipe/swrast (GLX on Xvfb)
)

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root for: $*"; fi
}

missing=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  log "apt packages already installed"
else
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  t=$SECONDS
  APT=(apt-get -o DPkg::Lock::Timeout=600 -o APT::Update::Error-Mode=any)
  # Try without an index refresh first (fast when the lists are fresh);
  # refresh and retry when a package is unknown or a download 404s.
  if ! as_root "${APT[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2; then
    log "retrying after apt-get update"
    as_root "${APT[@]}" update -q >&2 || die "apt-get update failed (is the Debian mirror reachable?)"
    as_root "${APT[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2 \
      || die "apt-get install failed for: ${missing[*]}"
  fi
  log "apt packages installed in $((SECONDS - t)) s"
fi

# node-gyp must find the Node headers locally: CI cannot reach nodejs.org.
NODEDIR=""
if command -v node >/dev/null 2>&1; then
  prefix=$(node -p 'require("path").resolve(process.execPath, "../..")')
  if [ -f "$prefix/include/node/common.gypi" ] && [ -f "$prefix/include/node/node_api.h" ]; then
    NODEDIR=$prefix
  fi
fi

gl_loads() {
  (cd "$PROJECT" && node -e 'require("gl")' >/dev/null 2>&1)
}

if [ "$BUILD_GL" = 1 ]; then
  command -v npm >/dev/null 2>&1 || die "npm not found"
  [ -f "$PROJECT/package.json" ] || die "$PROJECT/package.json not found"
  if gl_loads; then
    log "gl already built in $PROJECT/node_modules/gl"
  else
    [ -n "$NODEDIR" ] && export npm_config_nodedir="$NODEDIR"  # node-gyp: local headers
    [ -n "$NODEDIR" ] || log "warning: no local Node headers found; node-gyp will try to download them from nodejs.org"
    export JOBS="${GL_BUILD_JOBS:-$(nproc)}"    # node-gyp --jobs
    t=$SECONDS
    [ -f "$PROJECT/node_modules/gl/binding.gyp" ] || die "node_modules/gl is missing: run npm ci first (gl is an optional dependency of gpu.js)"
    NODE_GYP="$(npm root -g)/npm/node_modules/node-gyp/bin/node-gyp.js"
    [ -f "$NODE_GYP" ] || die "node-gyp not found at $NODE_GYP (it ships with npm)"
    log "building gl with node-gyp (jobs=$JOBS; ~1.5 min on 2 cores)"
    (cd "$PROJECT/node_modules/gl" && node "$NODE_GYP" rebuild --jobs "$JOBS" ${NODEDIR:+--nodedir="$NODEDIR"} >&2) || die "node-gyp rebuild of gl failed"
    gl_loads || die "gl still does not load after the build (see the node-gyp output above)"
    log "gl built in $((SECONDS - t)) s"
  fi
fi

if [ "$CHECK" = 1 ]; then
  gl_loads || die "--check: gl does not load in $PROJECT (run with --build-gl)"
  (cd "$PROJECT" && xvfb-run -a -s "-screen 0 1280x1024x24 -nolisten tcp" node -e '
    const gl = require("gl")(1, 1);
    if (!gl) { console.error("gl(1,1) returned null"); process.exit(1); }
    const d = gl.getExtension("WEBGL_debug_renderer_info");
    console.log(JSON.stringify({
      version: gl.getParameter(gl.VERSION), renderer: gl.getParameter(gl.RENDERER),
      unmaskedRenderer: d && gl.getParameter(d.UNMASKED_RENDERER_WEBGL),
      floatTextures: !!gl.getExtension("OES_texture_float"),
      // ANGLE reports only "ANGLE"; the native driver shows in the process maps
      // (swrast_dri.so + libLLVM = Mesa llvmpipe, i.e. software rendering)
      nativeDriver: [...new Set(require("fs").readFileSync("/proc/self/maps", "utf8").split("\n")
        .map(l => l.split(/\s+/)[5]).filter(p => p && /_dri\.so|libGLX_|libLLVM/.test(p)))] }));
    gl.getExtension("STACKGL_destroy_context")?.destroy();') >&2 || die "--check failed"
fi

cat >&2 <<EOF
[setup-headlessgl] ready. Run GL tests under an X server, e.g.
    xvfb-run -a -s "-screen 0 1280x1024x24 -nolisten tcp" npm test
  or
    Xvfb :99 -screen 0 1280x1024x24 -nolisten tcp & export DISPLAY=:99
EOF
