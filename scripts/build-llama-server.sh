#!/usr/bin/env bash
# Build one of llama.cpp's own tools (default `llama-server`) once per (version, CPU feature
# set) into a cache that every checkout on this box shares, and print the binary's path. The
# benchmarks run them beside the daemon as references: llama-server (parallel slots and
# continuous batching) and llama-bench (llama.cpp's own prompt and decode speed).
#
#     scripts/build-llama-server.sh VERSION [PYTHON [TOOL]]   (or: make llama-server, make llama-bench)
#
# The sources are the llama.cpp that llama-cpp-python VERSION vendors (its sdist, from the
# package index), so the server runs the same llama.cpp as the wheel, built with the same CPU
# arguments (scripts/llama-cmake-args.sh) as scripts/build-llama.sh. The build needs no network
# beyond the package index: no curl, no OpenSSL, and no web UI (llama.cpp would download its
# prebuilt assets or run npm; the server then simply has no UI). The binary is linked
# statically against llama.cpp, so the cached file stands alone. Logs go to stderr.
#
# Slots: -c is the total context; with -np N slots and the KV cache not unified each slot gets
# c/N (n_ctx_slot in its log, n_ctx in GET /slots). --kv-unified, the default only when -np is
# left on auto, gives every slot the whole -c instead. Four slots of 1024 tokens:
#     llama-server -m MODEL -np 4 -c 4096 --no-kv-unified -t 2 --no-webui --port PORT
set -euo pipefail

VERSION=${1:?usage: build-llama-server.sh VERSION [PYTHON [TOOL]]}
PYTHON=${2:-python3}
TOOL=${3:-llama-server}
case "$TOOL" in
  llama-server|llama-bench) ;;
  *) echo "unknown tool $TOOL (llama-server or llama-bench)" >&2; exit 2 ;;
esac
JOBS=${LLAMA_BUILD_JOBS:-2}

cpu_args=$("$(dirname "$0")/llama-cmake-args.sh")
args="$cpu_args -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF"
args+=" -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
args+=" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF"
args+=" -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF"

key=$(printf '%s %s %s' "$VERSION" "$(uname -m)" "$args" | sha256sum | cut -c1-16)
dir="${XDG_CACHE_HOME:-$HOME/.cache}/edgeagent/llama-server/$key"
bin="$dir/$TOOL"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

echo "building $TOOL from llama-cpp-python $VERSION's llama.cpp (several minutes)" >&2
echo "cmake args: $args" >&2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/$TOOL-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

"$PYTHON" -m pip download --no-deps --no-binary :all: --no-cache-dir --progress-bar off \
    -d "$tmp" "llama-cpp-python==$VERSION" >&2
mkdir "$tmp/src"
tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp/src" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
rm "$tmp/llama_cpp_python-$VERSION.tar.gz"

# The wheel's build gets CMake from the package index; use the system's when it has one.
cmake=$(command -v cmake || true)
if [[ -z "$cmake" ]]; then
  echo "no cmake on PATH: installing it from the package index into the build directory" >&2
  "$PYTHON" -m pip install --quiet --progress-bar off --target "$tmp/cmake" cmake >&2
  cmake="$tmp/cmake/bin/cmake"
  export PYTHONPATH="$tmp/cmake"
fi

# shellcheck disable=SC2086  # $args is a list of words
"$cmake" -S "$tmp/src" -B "$tmp/build" $args >&2
"$cmake" --build "$tmp/build" --target "$TOOL" -j"$JOBS" >&2
"$tmp/build/bin/$TOOL" --help >/dev/null 2>&1  # runs at all (llama-bench has no --version)

# Into the cache atomically: copy next to the final name (same filesystem), then rename.
mkdir -p "$dir"
cp "$tmp/build/bin/$TOOL" "$bin.tmp.$$"
mv -f "$bin.tmp.$$" "$bin"
echo "built $bin in $(($(date +%s) - start)) s" >&2
echo "$bin"
