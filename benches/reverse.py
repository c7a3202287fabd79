#!/usr/bin/env python3
"""The Transformer of "Attention Is All You Need" trained from scratch by
modelc on a sequence-to-sequence task: reversing strings of 8-16 digits.

Writes the examples (a safetensors file with `src_ids`, `src_mask`,
`tgt_ids`, `labels`; bytes as tokens, 1 starts the output, 2 ends it, 0
pads, labels -100 where ignored), trains `specs/transformer.model` at a small
size with `modelc train --data`, then decodes the held-out sources greedily
with `modelc infer --prompts` (with the key/value cache, then `--no-cache`:
the same lines) and prints the exact-match rate and the times.

    python3 benches/reverse.py [--steps 5000] [--threads 2] [--peer-steps 500]

Then `--peer-steps` steps of the same model in PyTorch (`nn.Transformer`,
post-norm, the shared embedding scaled by sqrt(dim), sinusoidal positions,
the same batches' shapes and masks, the same threads) for the time a step
takes against modelc's (the median `seconds` of its metrics.jsonl).
`nn.Transformer` also normalises the encoder's and decoder's outputs once
more (two LayerNorms the spec does not have).

Needs numpy, safetensors and torch; builds modelc in release first.
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
    ap.add_argument("--peer-steps", type=int, default=500)
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
    # The same decoding with every step recomputing the encoder and the prefix.
    started = time.time()
    recomputed = subprocess.run(infer + ["--no-cache"], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout.splitlines()
    recompute_s = time.time() - started
    assert recomputed == decoded, "the cached and recomputed decodings differ"
    right = sum(got == src[::-1] for got, src in zip(decoded, held))
    scores = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evaluated = [s["eval_exact_match"] for s in scores if "eval_exact_match" in s][-1]
    modelc_step = float(np.median([s["seconds"] for s in scores if "seconds" in s]))
    torch_step = torch_step_seconds(tensors, args) if args.peer_steps else None
    print(json.dumps({
        "modelc_step_s": round(modelc_step, 4),
        "pytorch_step_s": torch_step and round(torch_step, 4),
        "speedup": torch_step and round(torch_step / modelc_step, 2),
        "train_examples": args.train, "held_out": len(held), "steps": args.steps, "batch": args.batch,
        "threads": args.threads, "train_s": round(train_s, 1), "decode_s": round(infer_s, 2),
        "decode_no_cache_s": round(recompute_s, 2),
        "greedy_exact_match": right / len(held), "evaluated_exact_match": evaluated,
    }))
    return 0 if right / len(held) >= 0.99 and train_s <= 600 else 1


def torch_step_seconds(tensors, args):
    """The median time of a training step of the same model in PyTorch."""
    import math
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, vocab = 128, 256

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, dim)
            self.core = torch.nn.Transformer(dim, 4, 2, 2, 512, dropout=0.0, batch_first=True)
            length = max(tensors["src_ids"].shape[1], tensors["tgt_ids"].shape[1])
            pos = torch.arange(length)[:, None] / 10000 ** (torch.arange(0, dim, 2) / dim)
            self.register_buffer("positions", torch.cat([pos.sin(), pos.cos()], -1))

        def forward(self, src, mask, tgt):
            e = lambda ids: self.embed(ids) * math.sqrt(dim) + self.positions[: ids.shape[1]]
            causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            h = self.core(e(src), e(tgt), tgt_mask=causal, src_key_padding_mask=mask == 0,
                          memory_key_padding_mask=mask == 0)
            return h @ self.embed.weight.T

    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    t = {k: torch.from_numpy(v.astype(np.int64)) for k, v in tensors.items()}
    times = []
    for step in range(args.peer_steps):
        rows = torch.randint(0, len(t["src_ids"]), (args.batch,))
        started = time.time()
        logits = model(t["src_ids"][rows], t["src_mask"][rows], t["tgt_ids"][rows])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), t["labels"][rows].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.time() - started)
    return float(np.median(times))


if __name__ == "__main__":
    sys.exit(main())
