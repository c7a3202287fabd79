"""Sparse experts: modelc's Mixtral spec with each token through its 2
chosen experts only (the default) against the dense lowering (every expert
over every token, `--dense-routes`) and against transformers'
MixtralForCausalLM (eager, CPU), all on the same weights and threads in this
one run. The shape is Mixtral's, small enough for 2 cores: dim 256, 8
experts (hidden 896), top-2, 4 layers, 8 heads (4 key/value), vocab 512.

  1. a training step (forward + backward + AdamW, load-balancing loss on)
     on a batch of 8 x 128 tokens (each round: the median of 3 steps after
     a first, PyTorch and the two lowerings in turn),
  2. greedy decoding of 128 tokens after an 8-token prompt.

With `--bf16`, also the training step in mixed precision: modelc's
`--precision bf16` (sparse) against transformers under bf16 autocast,
alternated with the rest.

    pip install torch transformers
    cargo build --release && python3 benches/moe.py [--threads 2] [--bf16]

Prints medians and ratios, and the executed FLOPs of the two lowerings
(`modelc info`); docs/cpu.md keeps the results.
"""

import argparse
import json
import pathlib
import re
import statistics
import tempfile

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

# The same timing, PyTorch training step and modelc runner as the stories15M benchmark.
from stories15m import median_time, modelc, torch_train_step
SHAPE = dict(
    vocab_size=512, hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    rms_norm_eps=1e-5, router_aux_loss_coef=0.02, output_router_logits=True, tie_word_embeddings=False,
    sliding_window=None, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
BATCH, SEQ, NEW_TOKENS = 8, 128, 128


def torch_decode(model, prompt, repeats):
    ids = torch.tensor([prompt])

    def generate():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    tokens = generate()[0, len(prompt):].tolist()
    return median_time(generate, repeats), tokens


def spec_args(run, dense):
    return ["specs/mixtral.model", "--config", str(run / "config.json"), *(["--dense-routes"] if dense else [])]


def modelc_train_step(run, threads, steps, dense, extra=()):
    out = run / ("train-dense" if dense else "train")
    modelc([
        "train", *spec_args(run, dense), "--weights", str(run / "model.safetensors"),
        "--batch-file", str(run / "batch.safetensors"), "--steps", str(steps), "--lr", "1e-4", "--clip", "1.0",
        "--threads", str(threads), "--checkpoint-every", "0", "--out", str(out), "--overwrite", *extra,
    ])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["seconds"] for m in lines[1:]), lines[-1].get("expert_load")


def modelc_decode(run, threads, prompt, dense):
    out = modelc([
        "infer", *spec_args(run, dense), "--weights", str(run / "model.safetensors"),
        "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0",
        "--context", "256", "--threads", str(threads), "--json",
    ])
    # "N tokens in S s, ...": decoding time without start-up and compilation.
    words = out.stderr.split()
    return float(words[words.index("tokens") + 2]), json.loads(out.stdout)["new_token_ids"]


def forward_flops(run, dense):
    """The forward's FLOPs at B=1, T=128 as `modelc info` reports them."""
    text = modelc(["info", *spec_args(run, dense)]).stdout
    return float(re.search(r"FLOPs +([0-9.e+]+)", text).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also time the step in bf16 mixed precision, both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**SHAPE))
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    prompt = ids[0, :8].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        run = pathlib.Path(tmp)
        model.save_pretrained(run)
        save_file({"input_ids": ids}, run / "batch.safetensors")
        print(f"Mixtral shape: {params / 1e6:.1f}M parameters, {args.threads} threads, torch {torch.__version__}")
        flops = {dense: forward_flops(run, dense) for dense in (False, True)}

        model.eval()
        decode = {"torch": [], False: [], True: []}
        tokens = {}
        for _ in range(args.repeats):  # alternating, so that drift hits all three alike
            t, tokens["torch"] = torch_decode(model, prompt, 1)
            decode["torch"].append(t)
            for dense in (False, True):
                t, tokens[dense] = modelc_decode(run, args.threads, prompt, dense)
                decode[dense].append(t)
        decode = {k: statistics.median(v) for k, v in decode.items()}

        model.train()
        steps = {"torch": [], False: [], True: [], "torch bf16": [], "bf16": []}
        load = None
        for _ in range(args.repeats):  # alternating too: each round's median of 3 steps after a first
            steps["torch"].append(torch_train_step(model, ids, 3))
            for dense in (False, True):
                t, load_of = modelc_train_step(run, args.threads, 4, dense)
                steps[dense].append(t)
                load = load if dense else load_of
            if args.bf16:
                steps["torch bf16"].append(torch_train_step(model, ids, 3, bf16=True))
                steps["bf16"].append(modelc_train_step(run, args.threads, 4, False, ["--precision", "bf16"])[0])
        steps = {k: statistics.median(v) for k, v in steps.items() if v}

    print(f"{'':34}{'sparse':>10}{'dense':>10}{'PyTorch':>10}{'vs dense':>10}{'vs torch':>10}")
    s, d, t = steps[False], steps[True], steps["torch"]
    print(f"{'training step 8 x 128 (s)':34}{s:>10.3f}{d:>10.3f}{t:>10.3f}{d / s:>9.2f}x{t / s:>9.2f}x")
    if args.bf16:
        s, t = steps["bf16"], steps["torch bf16"]
        print(f"{'  bf16 (autocast for PyTorch)':34}{s:>10.3f}{'':>10}{t:>10.3f}{'':>10}{t / s:>9.2f}x")
    s, d, t = (NEW_TOKENS / decode[k] for k in (False, True, "torch"))
    print(f"{'greedy decode 128 tokens (tok/s)':34}{s:>10.1f}{d:>10.1f}{t:>10.1f}{s / d:>9.2f}x{s / t:>9.2f}x")
    print(f"{'forward FLOPs, B=1 T=128':34}{flops[False]:>10.3g}{flops[True]:>10.3g}{'':>10}"
          f"{flops[True] / flops[False]:>9.2f}x")
    same = sum(a == b for a, b in zip(tokens[False], tokens["torch"]))
    print(f"greedy tokens equal to transformers': {same}/{NEW_TOKENS} (dense lowering: "
          f"{sum(a == b for a, b in zip(tokens[True], tokens['torch']))}/{NEW_TOKENS})")
    if load is not None:
        print(f"expert load of the last step (tokens per expert, layer by layer): {load}")


if __name__ == "__main__":
    main()
