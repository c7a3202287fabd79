#!/usr/bin/env python3
"""A small Vision Transformer (specs/vit.model) trained from scratch by
modelc on scikit-learn's bundled 8 x 8 digits: 1,797 images, the last 20%
(after a seeded shuffle) held out.

Writes the examples (`pixel_values` [N, 1, 8, 8] scaled to [0, 1], `labels`
[N]), trains with `modelc train --data`, and the same model with
transformers' ViTForImageClassification (same sizes, AdamW, warmup and
cosine schedule, batches of the same size, the same threads), alternating
the two `--repeats` times; prints each run's time and held-out accuracy
(modelc: at its best evaluation; PyTorch: at the end) and the medians.

    python3 benches/digits.py [--steps 4000] [--threads 2] [--repeats 2]

Needs numpy, safetensors, scikit-learn, torch and transformers; builds
modelc in release first.
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
    ap.add_argument("--repeats", type=int, default=2)
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

    held = int(len(labels) * 0.2)
    runs = {"modelc": [], "pytorch": []}
    for r in range(args.repeats):
        runs["modelc"].append(modelc_run(modelc, data, os.path.join(work, f"run{r}"), args))
        runs["pytorch"].append(torch_run(pixels, labels, held, args))
        print(json.dumps({"repeat": r, "modelc": runs["modelc"][-1], "pytorch": runs["pytorch"][-1]}), flush=True)
    median = {k: round(float(np.median([v["train_s"] for v in runs[k]])), 1) for k in runs}
    print(json.dumps({
        "images": len(labels), "held_out": held, "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "modelc_train_s": median["modelc"], "pytorch_train_s": median["pytorch"],
        "speedup": round(median["pytorch"] / median["modelc"], 2),
        "modelc_accuracy": [v["accuracy"] for v in runs["modelc"]],
        "pytorch_accuracy": [v["accuracy"] for v in runs["pytorch"]],
    }))
    best = min(v["accuracy"] for v in runs["modelc"])
    return 0 if best >= 0.95 and median["modelc"] <= 300 else 1


def modelc_run(modelc, data, out, args):
    train = [modelc, "train", "specs/vit.model", *MODEL, "--data", data, "--out", out, "--steps", str(args.steps),
             "--batch", str(args.batch), "--lr", "1e-3", "--warmup", "100", "--eval-every", "100",
             "--eval-split", "0.2", "--threads", str(args.threads)]
    started = time.time()
    subprocess.run(train, cwd=ROOT, check=True, capture_output=True)
    seconds = time.time() - started
    scores = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    best = min((s for s in scores if "eval_loss" in s), key=lambda s: s["eval_loss"])
    return {"train_s": round(seconds, 1), "accuracy": best["eval_accuracy"]}


def torch_run(pixels, labels, held, args):
    """The same model and schedule in transformers (weight decay 0.05 as the spec's)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, get_cosine_schedule_with_warmup
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.0, num_labels=10)
    model = ViTForImageClassification(config)
    x, y = torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))
    train_x, train_y, test_x, test_y = x[:-held], y[:-held], x[-held:], y[-held:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(opt, 100, args.steps)
    g = torch.Generator().manual_seed(0)
    started = time.time()
    model.train()
    order, at = torch.randperm(len(train_y), generator=g), 0
    for _ in range(args.steps):
        if at + args.batch > len(order):
            order, at = torch.randperm(len(train_y), generator=g), 0
        rows = order[at:at + args.batch]
        at += args.batch
        loss = model(train_x[rows], labels=train_y[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    seconds = time.time() - started
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).logits.argmax(-1) == test_y).float().mean().item()
    return {"train_s": round(seconds, 1), "accuracy": round(accuracy, 5)}


if __name__ == "__main__":
    sys.exit(main())
