#!/usr/bin/env bash
# Batch-1 inference against llama.cpp (see benches/decode.py): installs the
# peers from PyPI (llama-cpp-python builds llama.cpp from source, for this
# CPU), builds modelc in release, and runs both on the same weights and
# threads, alternating. Arguments go to decode.py, e.g. `--formats f32,q8`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q numpy safetensors gguf
python3 -c "import llama_cpp" 2>/dev/null ||
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip install -q llama-cpp-python
cargo build --release --bin modelc
exec python3 benches/decode.py "$@"
