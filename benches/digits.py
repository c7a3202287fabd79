#!/usr/bin/env python3
"""A small Vision Transformer (specs/vit.model) trained from scratch by
modelc on scikit-learn's bundled 8 x 8 digits: 1,797 images, the last 20%
(after a seeded shuffle) held out.

Writes the examples (`pixel_values` [N, 1, 8, 8] scaled to [0, 1], `labels`
[N]), trains with `modelc train --data`, and prints the held-out accuracy of
the best evaluation and the time taken.

    python3 benches/digits.py [--steps 4000] [--threads 2]

Needs numpy, safetensors and scikit-learn; builds modelc in release first.
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
from sklearn.datasets import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--set", "image=8", "--set", "patch=2", "--set", "channels=1", "--set", "dim=64", "--set", "layers=2",
         "--set", "heads=4", "--set", "hidden=128", "--set", "classes=10", "--set", "dropout=0.1"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    modelc = os.path.join(ROOT, "target", "release", "modelc")
    work = tempfile.mkdtemp(prefix="modelc-digits-")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    pixels = (digits.images[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = digits.target[order].astype(np.int32)
    data = os.path.join(work, "digits.safetensors")
    save_file({"pixel_values": pixels, "labels": labels}, data)

    out = os.path.join(work, "run")
    train = [modelc, "train", "specs/vit.model", *MODEL, "--data", data, "--out", out, "--steps", str(args.steps),
             "--batch", str(args.batch), "--lr", "1e-3", "--warmup", "100", "--eval-every", "100",
             "--eval-split", "0.2", "--threads", str(args.threads)]
    started = time.time()
    subprocess.run(train, cwd=ROOT, check=True)
    seconds = time.time() - started
    scores = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [s for s in scores if "eval_loss" in s]
    best = min(evals, key=lambda s: s["eval_loss"])
    print(json.dumps({
        "images": len(labels), "held_out": int(len(labels) * 0.2), "steps": args.steps,
        "batch": args.batch, "threads": args.threads, "train_s": round(seconds, 1),
        "best_eval_loss": best["eval_loss"], "accuracy_at_best": best["eval_accuracy"],
        "last_accuracy": evals[-1]["eval_accuracy"],
    }))
    return 0 if best["eval_accuracy"] >= 0.95 and seconds <= 300 else 1


if __name__ == "__main__":
    sys.exit(main())
