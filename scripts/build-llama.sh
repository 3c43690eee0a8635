#!/usr/bin/env bash
# Build llama-cpp-python's wheel once per (version, CPU feature set) into a cache that every
# checkout on this box shares, and print the wheel's path.
#
# Why not a plain `pip install llama-cpp-python`: its default build uses -march=native, which
# on recent Xeons turns on llama.cpp's AMX kernels; those crash or produce garbage on several
# hypervisors (ggml-org/llama.cpp#20824). We build with the CPU's features listed explicitly and
# AMX off (scripts/llama-cmake-args.sh, shared with build-llama-server.sh). pip's own wheel
# cache ignores CMAKE_ARGS, so the cache here is keyed on them.
set -euo pipefail

VERSION=${1:?usage: build-llama.sh VERSION [PYTHON]}
PYTHON=${2:-python3}

args=$("$(dirname "$0")/llama-cmake-args.sh")

key=$(printf '%s %s %s' "$VERSION" "$(uname -m)" "$args" | sha256sum | cut -c1-16)
dir="${XDG_CACHE_HOME:-$HOME/.cache}/edgeagent/wheels/$key"
wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$wheel" ]]; then
  echo "building llama-cpp-python $VERSION (compiles llama.cpp: several minutes the first time)" >&2
  echo "CMAKE_ARGS=$args" >&2
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  CMAKE_ARGS="$args" "$PYTHON" -m pip wheel --no-deps --no-cache-dir --progress-bar off \
      --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$VERSION" >&2
  mkdir -p "$dir"
  mv "$tmp"/llama_cpp_python-*.whl "$dir"/
  rm -rf "$tmp"
  wheel=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
fi
echo "$wheel"
