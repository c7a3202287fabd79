#!/usr/bin/env python3
"""A small Vision Transformer (specs/vit.model), or with `--model cnn` the
convolutional classifier specs/cnn.model, trained from scratch by modelc on
scikit-learn's bundled 8 x 8 digits: 1,797 images, the last 20% (after a
seeded shuffle) held out.

Writes the examples (`pixel_values` [N, 1, 8, 8] scaled to [0, 1], `labels`
[N]), trains with `modelc train --data`, and the same model with
transformers' ViTForImageClassification (or the same CNN in torch.nn; same
sizes, AdamW, warmup and cosine schedule, batches of the same size, the
same threads), alternating
the two `--repeats` times; prints each run's time and held-out accuracy
(modelc: at its best evaluation; PyTorch: at the end) and the medians.

    python3 benches/digits.py [--model vit|cnn] [--steps N] [--threads 2] [--repeats 2]

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
# Each model: its spec, sizes, learning rate, weight decay and default steps.
MODELS = {
    "vit": ("specs/vit.model", ["image=8", "patch=2", "channels=1", "dim=64", "layers=2", "heads=4", "hidden=128",
                                "classes=10", "dropout=0.1"], 1e-3, 0.05, 4000),
    "cnn": ("specs/cnn.model", ["image=8", "channels=1", "width=16", "classes=10", "dropout=0.1"], 3e-3, 0.01, 1500),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    args.steps = args.steps or MODELS[args.model][4]
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
        "model": args.model, "images": len(labels), "held_out": held, "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "modelc_train_s": median["modelc"], "pytorch_train_s": median["pytorch"],
        "speedup": round(median["pytorch"] / median["modelc"], 2),
        "modelc_accuracy": [v["accuracy"] for v in runs["modelc"]],
        "pytorch_accuracy": [v["accuracy"] for v in runs["pytorch"]],
    }))
    best = min(v["accuracy"] for v in runs["modelc"])
    return 0 if best >= 0.95 and median["modelc"] <= 300 else 1


def modelc_run(modelc, data, out, args):
    spec, sizes, lr, _, _ = MODELS[args.model]
    sets = [arg for size in sizes for arg in ["--set", size]]
    train = [modelc, "train", spec, *sets, "--data", data, "--out", out, "--steps", str(args.steps),
             "--batch", str(args.batch), "--lr", str(lr), "--warmup", "100", "--eval-every", "100",
             "--eval-split", "0.2", "--threads", str(args.threads)]
    started = time.time()
    subprocess.run(train, cwd=ROOT, check=True, capture_output=True)
    seconds = time.time() - started
    scores = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    best = min((s for s in scores if "eval_loss" in s), key=lambda s: s["eval_loss"])
    return {"train_s": round(seconds, 1), "accuracy": best["eval_accuracy"]}


def torch_model(name):
    """The spec's model in PyTorch: logits from a batch of pixels."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    if name == "vit":
        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.0, num_labels=10)
        vit = ViTForImageClassification(config)
        return vit, lambda x: vit(x).logits
    nn = torch.nn
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, 10))
    return cnn, cnn


def torch_run(pixels, labels, held, args):
    """The same model and schedule in PyTorch (learning rate and weight decay as the spec's)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, _, lr, decay, _ = MODELS[args.model]
    model, logits = torch_model(args.model)
    x, y = torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))
    train_x, train_y, test_x, test_y = x[:-held], y[:-held], x[-held:], y[-held:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
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
        loss = torch.nn.functional.cross_entropy(logits(train_x[rows]), train_y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    seconds = time.time() - started
    model.eval()
    with torch.no_grad():
        accuracy = (logits(test_x).argmax(-1) == test_y).float().mean().item()
    return {"train_s": round(seconds, 1), "accuracy": round(accuracy, 5)}


if __name__ == "__main__":
    sys.exit(main())
