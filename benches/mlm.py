"""Masked-language-model pretraining: modelc's `train` on specs/bert-mlm.model
against transformers' BertForMaskedLM on the same text, tokenizer, model
size, masking rule (15% of the non-special tokens; of those 80% [MASK], 10%
a random token, 10% kept), optimiser (AdamW, betas 0.9/0.999, eps 1e-8,
weight decay 0.01 on every weight), linear schedule with warmup, batch and
threads. Each draws its own random windows, masks and initial weights, so
the curves agree in distribution, not step for step.

    cargo build --release
    pip install torch transformers tokenizers
    python3 benches/mlm.py [--steps 600] [--threads 2] [--lr 1e-3] [--dropout 0.1]

The text is the GPL-3 (/usr/share/common-licenses/GPL-3), its last 10% held
out; the tokenizer the test fixtures' WordPiece vocabulary
(tests/fixtures/hf/bert-mlm/tokenizer.json). Prints the masked-LM loss on
the training batches and held out at each evaluation, and seconds per step.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertForMaskedLM, get_linear_schedule_with_warmup

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELC = ROOT / "target" / "release" / "modelc"
TEXT = pathlib.Path("/usr/share/common-licenses/GPL-3")
TOKENIZER = ROOT / "tests" / "fixtures" / "hf" / "bert-mlm" / "tokenizer.json"
BATCH, SEQ, EVAL_EVERY = 32, 128, 100


def config(vocab, dropout):
    return BertConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        max_position_embeddings=512, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        layer_norm_eps=1e-12, pad_token_id=0,
    )


def ours(cfg, steps, lr, warmup, threads):
    """(train losses by step, held-out losses by step, seconds a step) of `modelc train`."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "config.json").write_text(cfg.to_json_string())
        cmd = [str(MODELC), "train", "specs/bert-mlm.model", "--config", str(tmp / "config.json"), "--tokenizer",
               str(TOKENIZER), "--data", str(TEXT), "--steps", str(steps), "--batch", str(BATCH), "--seq-len",
               str(SEQ), "--lr", str(lr), "--warmup", str(warmup), "--eval-every", str(EVAL_EVERY), "--threads",
               str(threads), "--out", str(tmp / "run")]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if out.returncode != 0:
            sys.exit(f"modelc failed:\n{out.stderr}")
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    held = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    return train, held, seconds / steps


def mask(ids, vocab, mask_id, special, generator):
    """BERT's rule on a batch of ids: (inputs, labels with -100 where not chosen)."""
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & ~torch.isin(ids, special)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    random = torch.randint(0, vocab, ids.shape, generator=generator)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random, inputs)
    return inputs, labels


def theirs(cfg, steps, lr, warmup, threads):
    """The same with transformers and torch.optim.AdamW."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(TOKENIZER))
    ids = torch.tensor(tok.encode(TEXT.read_text(), add_special_tokens=False).ids)
    held_len = int(len(ids) * 0.1)
    train_ids, held_ids = ids[: len(ids) - held_len], ids[len(ids) - held_len:]
    special = torch.tensor(sorted(tok.token_to_id(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                  if tok.token_to_id(t) is not None))
    mask_id = tok.token_to_id("[MASK]")
    model = BertForMaskedLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    generator = torch.Generator().manual_seed(1)
    positions = len(held_ids) - SEQ
    count = max(1, min(8, positions // (BATCH * SEQ)))
    held_batches = [torch.stack([held_ids[s: s + SEQ] for s in
                                 [(b * BATCH + k) * positions // (count * BATCH) for k in range(BATCH)]])
                    for b in range(count)]
    held_masked = [mask(b, cfg.vocab_size, mask_id, special, torch.Generator().manual_seed(2)) for b in held_batches]
    train, held = {}, {}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        starts = torch.randint(0, len(train_ids) - SEQ, (BATCH,), generator=generator)
        batch = torch.stack([train_ids[s: s + SEQ] for s in starts])
        inputs, labels = mask(batch, cfg.vocab_size, mask_id, special, generator)
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        train[step] = loss.item()
        if step % EVAL_EVERY == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                held[step] = sum(model(input_ids=i, labels=l).loss.item() for i, l in held_masked) / len(held_masked)
    return train, held, (time.perf_counter() - started) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    if not MODELC.exists():
        sys.exit("build modelc first: cargo build --release")
    vocab = Tokenizer.from_file(str(TOKENIZER)).get_vocab_size()
    cfg = config(vocab, args.dropout)
    runs = {
        "modelc": ours(cfg, args.steps, args.lr, args.warmup, args.threads),
        "transformers": theirs(cfg, args.steps, args.lr, args.warmup, args.threads),
    }
    print(f"BertForMaskedLM dim 128, 4 layers, vocab {vocab}; {args.steps} steps of {BATCH} x {SEQ}, lr {args.lr}, "
          f"warmup {args.warmup}, dropout {args.dropout}, {args.threads} threads")
    print("step   " + "   ".join(f"{n:>12} train / held out" for n in runs))
    for step in sorted(runs["modelc"][1]):
        row = []
        for train, held, _ in runs.values():
            # Training loss: the mean of the evaluation interval's last 20 steps (one batch is noisy).
            recent = [train[s] for s in range(max(1, step - 19), step + 1) if s in train]
            row.append(f"{sum(recent) / len(recent):12.3f} / {held.get(step, float('nan')):8.3f}")
        print(f"{step:5d}  " + "   ".join(row))
    for name, (_, _, per_step) in runs.items():
        print(f"{name}: {per_step:.3f} s a step, {BATCH * SEQ / per_step:,.0f} tokens/s")


if __name__ == "__main__":
    main()
