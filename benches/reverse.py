#!/usr/bin/env python3
"""The Transformer of "Attention Is All You Need" trained from scratch by
modelc on a sequence-to-sequence task: reversing strings of 8-16 digits.

Writes the examples (a safetensors file with `src_ids`, `src_mask`,
`tgt_ids`, `labels`; bytes as tokens, 1 starts the output, 2 ends it, 0
pads, labels -100 where ignored), trains `specs/transformer.model` at a small
size with `modelc train --data`, then decodes the held-out sources greedily
with `modelc infer --prompts` and prints the exact-match rate and the times.

    python3 benches/reverse.py [--steps 5000] [--threads 2]

Needs numpy and safetensors; builds modelc in release first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--set", "vocab=256", "--set", "dim=128", "--set", "heads=4", "--set", "hidden=512",
         "--set", "encoder_layers=2", "--set", "decoder_layers=2", "--set", "dropout=0.0"]
START, STOP = 1, 2


def examples(n, seed, lo=8, hi=16):
    """`n` reversal examples and their source strings."""
    rng = np.random.default_rng(seed)
    s, t = hi, hi + 1
    src, mask = np.zeros((n, s), np.int32), np.zeros((n, s), np.int32)
    tgt, labels = np.zeros((n, t), np.int32), np.full((n, t), -100, np.int32)
    lines = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        digits = rng.integers(0, 10, length) + ord("0")
        src[i, :length], mask[i, :length] = digits, 1
        tgt[i, 0], tgt[i, 1:length + 1] = START, digits[::-1]
        labels[i, :length], labels[i, length] = digits[::-1], STOP
        lines.append("".join(map(chr, digits)))
    return {"src_ids": src, "src_mask": mask, "tgt_ids": tgt, "labels": labels}, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=50000, help="training examples")
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    modelc = os.path.join(ROOT, "target", "release", "modelc")
    work = tempfile.mkdtemp(prefix="modelc-reverse-")
    n = args.train + args.held_out
    tensors, lines = examples(n, seed=0)
    data = os.path.join(work, "reverse.safetensors")
    save_file(tensors, data)
    held = lines[args.train:]
    prompts = os.path.join(work, "held-out.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(held) + "\n")

    out = os.path.join(work, "run")
    split = args.held_out / n
    train = [modelc, "train", "specs/transformer.model", *MODEL, "--data", data, "--out", out,
             "--steps", str(args.steps), "--batch", str(args.batch), "--lr", "1e-3", "--warmup", "200",
             "--eval-every", "1000", "--eval-split", repr(split), "--threads", str(args.threads)]
    started = time.time()
    subprocess.run(train, cwd=ROOT, check=True)
    train_s = time.time() - started

    infer = [modelc, "infer", "specs/transformer.model", *MODEL, "--weights", os.path.join(out, "model.safetensors"),
             "--prompts", prompts, "--start-id", str(START), "--stop-id", str(STOP), "--temperature", "0",
             "--max-new-tokens", "17", "--threads", str(args.threads)]
    started = time.time()
    decoded = subprocess.run(infer, cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()
    infer_s = time.time() - started
    right = sum(got == src[::-1] for got, src in zip(decoded, held))
    scores = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evaluated = [s["eval_exact_match"] for s in scores if "eval_exact_match" in s][-1]
    print(json.dumps({
        "train_examples": args.train, "held_out": len(held), "steps": args.steps, "batch": args.batch,
        "threads": args.threads, "train_s": round(train_s, 1), "decode_s": round(infer_s, 2),
        "greedy_exact_match": right / len(held), "evaluated_exact_match": evaluated,
    }))
    return 0 if right / len(held) >= 0.99 and train_s <= 600 else 1


if __name__ == "__main__":
    sys.exit(main())
