"""Writes tests/fixtures/quant/blocks.safetensors: a small f32 matrix and
its bf16, Q8_0 and Q4_0 encodings by the `gguf` package's reference
quantisers (llama.cpp's layouts, as bytes), which the packed-weight tests
compare modelc's quantisers with bit for bit.

    pip install gguf numpy safetensors && python3 tests/quant_fixtures.py
"""

import pathlib

import gguf
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(7)
w = (rng.standard_normal((6, 96)) * 0.05).astype(np.float32)
w[0, :32] = 0.0  # an all-zero block
w[1, 5] = 1.5  # an outlier
w[2, 40] = -2.0  # a negative outlier (q4 maps it to -8)
out = {"w": w}
for name, q in [("bf16", gguf.GGMLQuantizationType.BF16), ("q8_0", gguf.GGMLQuantizationType.Q8_0),
                ("q4_0", gguf.GGMLQuantizationType.Q4_0)]:
    out[name] = np.ascontiguousarray(gguf.quants.quantize(w, q)).view(np.uint8)
path = pathlib.Path(__file__).parent / "fixtures" / "quant" / "blocks.safetensors"
save_file(out, str(path))
print(path, {k: v.shape for k, v in out.items()})
