#!/usr/bin/env bash
# lorafit's GGUF exports against real llama.cpp (not CI: the build takes 10+ minutes on 2 cores).
#
#   bench/gguf_llamacpp.sh RUN_DIR [WORK]      e.g. bench/gguf_llamacpp.sh runs/quickstart /tmp/lorafit-llamacpp
#
# 1. builds llama.cpp from the sources in llama-cpp-python's sdist (PyPI), CPU only, no curl;
# 2. exports RUN_DIR as f32 (reference), f16, q8_0, q6_k and q4_k_m with `lorafit export`, merges it with
#    `lorafit merge` and converts the merged folder with llama.cpp's own convert_hf_to_gguf.py;
# 3. bench/gguf_llamacpp.py: per file, llama.cpp's load warnings, tokenization and greedy answers against
#    lorafit's (the demo prompts), llama-perplexity on the run's held-out split; and the relative RMS error of
#    lorafit's q4_k_m / q6_k tensors against llama-quantize's from the same f32 file, and their type mix.
# Writes WORK/results.json and prints a table. PYTHON (default: python) must have lorafit's dependencies.
set -euo pipefail
RUN=${1:?usage: bench/gguf_llamacpp.sh RUN_DIR [WORK]}
WORK=${2:-/tmp/lorafit-llamacpp}
PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
VERSION=0.3.36
mkdir -p "$WORK/exports"

SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -x "$SRC/build/bin/llama-quantize" ]; then
  [ -f "$WORK/llama_cpp_python-$VERSION.tar.gz" ] ||
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
  tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
  cmake -S "$SRC" -B "$SRC/build" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF
  cmake --build "$SRC/build" -j "$(nproc)" --target llama-cli llama-completion llama-server llama-tokenize \
    llama-perplexity llama-quantize
fi
BIN="$SRC/build/bin"

for dtype in f32 f16 q8_0 q6_k q4_k_m; do
  [ -f "$WORK/exports/$dtype.gguf" ] ||
    "$PY" -m lorafit export --adapter_path "$RUN" --dtype "$dtype" --output "$WORK/exports/$dtype.gguf"
done
for kind in Q4_K_M Q6_K; do  # llama.cpp's own quantizer, from the same f32 weights
  [ -f "$WORK/exports/llamacpp-$kind.gguf" ] ||
    "$BIN/llama-quantize" "$WORK/exports/f32.gguf" "$WORK/exports/llamacpp-$kind.gguf" "$kind"
done
if [ ! -f "$WORK/exports/converted-f16.gguf" ]; then
  # convert_hf_to_gguf.py imports sentencepiece before it looks for a tokenizer.model (its requirements.txt has it)
  "$PY" -c "import sentencepiece" 2>/dev/null ||
    { echo "llama.cpp's convert_hf_to_gguf.py needs sentencepiece: $PY -m pip install sentencepiece" >&2; exit 2; }
  rm -rf "$WORK/merged"
  "$PY" -m lorafit merge --adapter_path "$RUN" --output_dir "$WORK/merged"
  "$PY" "$SRC/convert_hf_to_gguf.py" "$WORK/merged" --outtype f16 --outfile "$WORK/exports/converted-f16.gguf"
fi
"$PY" "$REPO/bench/gguf_llamacpp.py" --run "$RUN" --work "$WORK" --bin "$BIN"
