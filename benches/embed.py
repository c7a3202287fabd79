"""Sentence embeddings of all-MiniLM-L6-v2 (as published) against
sentence-transformers, in the same run, on the same threads.

    pip install torch sentence-transformers
    cargo build --release && python3 benches/embed.py [--threads 2] [--sentences 2000] [--rounds 3] [--dtype bf16]

2,000 sentences of varied length (4 to ~200 tokens) cut from the GPL-3
text; both tools embed them all, alternating, `--rounds` times; the medians
and their ratio are printed, with the cosine of the two tools' embeddings.
"""

import argparse
import json
import pathlib
import random
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from minilm_fixtures import model_folder  # noqa: E402


def sentences(n: int) -> list[str]:
    words = open("/usr/share/common-licenses/GPL-3").read().split()
    rng = random.Random(0)
    out = []
    for _ in range(n):
        length = int(rng.lognormvariate(2.7, 0.8)) + 2
        start = rng.randrange(len(words) - length)
        out.append(" ".join(words[start:start + min(length, 150)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="f32", help="modelc's weights and products: f32 or bf16")
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    folder = model_folder()
    texts = sentences(args.sentences)
    input_file = ROOT / "target" / "embed-bench.txt"
    input_file.write_text("\n".join(texts) + "\n")
    model = SentenceTransformer(str(folder), device="cpu")
    command = [str(ROOT / "target/release/modelc"), "embed", str(ROOT / "specs/minilm.model"), "--weights", str(folder),
               "--threads", str(args.threads), "--dtype", args.dtype,
               "--output", str(ROOT / "target/embed-bench.safetensors")]
    ours, theirs = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        reference = model.encode(texts, batch_size=32, normalize_embeddings=True)
        theirs.append(time.perf_counter() - start)
        start = time.perf_counter()
        with open(input_file) as stdin:
            subprocess.run(command, stdin=stdin, check=True)
        ours.append(time.perf_counter() - start)
    from safetensors.numpy import load_file

    got = load_file(ROOT / "target/embed-bench.safetensors")["embeddings"]
    cosine = min(float(a @ b) for a, b in zip(got, reference))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{len(texts)} sentences, {args.threads} threads, modelc --dtype {args.dtype}, median of {args.rounds}: "
          f"modelc {a:.2f} s ({len(texts) / a:.0f}/s), sentence-transformers {b:.2f} s ({len(texts) / b:.0f}/s), "
          f"ratio {b / a:.2f}x; lowest cosine {cosine:.6f}")
    print(json.dumps({"modelc_s": ours, "sentence_transformers_s": theirs}))


if __name__ == "__main__":
    main()
