"""What compact weights cost in accuracy: the README's byte-level tiny-gpt
(trained on the GPL-3 text) on the held-out last 10% of that text, for
each `--dtype`: mean cross-entropy of the next byte (nats per byte) and
perplexity, through `forward` on windows of 128 bytes.

    ./tiny-gpt train --data /usr/share/common-licenses/GPL-3 --out runs/tiny-gpt   (the README's main job)
    python3 benches/perplexity.py ./tiny-gpt runs/tiny-gpt/model.safetensors
"""

import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

WINDOW = 128


def main():
    binary, weights = sys.argv[1], sys.argv[2]
    text = pathlib.Path(sys.argv[3] if len(sys.argv) > 3 else "/usr/share/common-licenses/GPL-3").read_bytes()
    held = np.frombuffer(text[len(text) - len(text) // 10:], dtype=np.uint8)
    n = len(held) // WINDOW
    ids = held[: n * WINDOW].reshape(n, WINDOW).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = pathlib.Path(tmp) / "in.safetensors"
        save_file({"input_ids": ids}, str(inputs))
        base = None
        print(f"{n} windows of {WINDOW} bytes from the last 10% of the text")
        for dtype in ["f32", "bf16", "q8", "q4"]:
            out = pathlib.Path(tmp) / f"{dtype}.safetensors"
            subprocess.run([binary, "forward", "--weights", weights, "--inputs", str(inputs), "--outputs", str(out),
                            "--dtype", dtype, "--device", "cpu"], check=True, capture_output=True)
            logits = load_file(str(out))["logits"][:, :-1].astype(np.float64)
            target = ids[:, 1:]
            shift = logits.max(-1, keepdims=True)
            logsumexp = np.log(np.exp(logits - shift).sum(-1)) + shift[..., 0]
            picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
            loss = float((logsumexp - picked).mean())
            base = loss if base is None else base
            print(f"{dtype:>5}: {loss:.4f} nats/byte, perplexity {np.exp(loss):.3f} ({loss - base:+.4f} against f32)")


if __name__ == "__main__":
    main()
