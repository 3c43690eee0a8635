#!/usr/bin/env bash
# Print the CMake arguments that every llama.cpp build of this project uses for the CPU, on
# one line: scripts/build-llama.sh (the llama-cpp-python wheel) and scripts/build-llama-server.sh
# (llama.cpp's own llama-server, the benchmark's reference) both take them from here, so the
# two builds run the same kernels. Both caches are keyed on this output: changing it rebuilds.
#
# Why not llama.cpp's default -march=native: on recent Xeons it turns on the AMX kernels, which
# crash or produce garbage on several hypervisors (ggml-org/llama.cpp#20824). On x86 the CPU's
# features are listed explicitly and AMX is off. llamafile's GEMM is off everywhere: it only
# takes batches of several tokens, so its different rounding would make a request's greedy
# answer depend on what else was batched with it (see edgeagent/decoder.py).
set -euo pipefail

args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_LLAMAFILE=OFF"
case "$(uname -m)" in
  x86_64|amd64)
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
                avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
                avx512_bf16:AVX512_BF16; do
      if [[ "$flags" == *" ${pair%%:*} "* ]]; then state=ON; else state=OFF; fi
      args+=" -DGGML_${pair#*:}=$state"
    done
    ;;
  *)
    # ARM and others: llama.cpp's native detection is what these boards want (see docs/deploy.md).
    args="-DGGML_NATIVE=ON -DGGML_LLAMAFILE=OFF"
    ;;
esac
echo "$args"
