"""Peak resident memory of a training run: modelc against PyTorch eager on
the CPU, at the stories15M shape (LLaMA, dim 288, 6 layers, vocab 32,000,
batch 8 x 256) and the GPT-2 124M shape (batch 4 x 128), same weights, same
batch, same threads, AdamW with clipping, in this one run. Each run is its
own process (peak RSS from wait4), modelc and PyTorch alternating; the
medians, the ratio, the median step time of each, and the memory plan's
arena beside the measured peak. Then bf16 mixed precision the same way:
modelc's `--precision bf16` against PyTorch's bf16 autocast on the CPU,
each beside its own f32 step.

    pip install torch transformers
    cargo build --release && python3 benches/train_memory.py [--threads 2] [--repeats 3]

docs/cpu.md keeps the results.
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELC = pathlib.Path(os.environ.get("MODELC", ROOT / "target" / "release" / "modelc"))
MIB = 1024 * 1024

SHAPES = {
    "stories15M": dict(
        spec="specs/llama.model", batch=8, seq=256, family="llama",
        config=dict(
            vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
            num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
    ),
    "GPT-2 124M": dict(spec="specs/gpt2.model", batch=4, seq=128, family="gpt2", config=dict()),
    # A real context, only when asked for (--shape "GPT-2 124M 8x1024"): ~1 min a step.
    "GPT-2 124M 8x1024": dict(spec="specs/gpt2.model", batch=8, seq=1024, family="gpt2", config=dict()),
}
DEFAULT_SHAPES = ["stories15M", "GPT-2 124M"]

# The PyTorch side, run in a process of its own so that its peak is its own.
TORCH_STEPS = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
run, steps, threads, bf16 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "bf16"
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
model.train()
ids = load_file(run + "/batch.safetensors")["input_ids"].long()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
times, losses = [], []
for _ in range(steps):
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    times.append(time.perf_counter() - start)
    losses.append(loss.item())
print(json.dumps({"seconds": times, "losses": losses}))
"""


def run_measured(cmd, cwd):
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        log = os.open(str(pathlib.Path(cwd) / ".measured.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    text = (pathlib.Path(cwd) / ".measured.log").read_text()
    code = os.waitstatus_to_exitcode(status)
    if code == -9:
        # The kernel's OOM killer: the peak is at least what it had reached.
        return None, usage.ru_maxrss * 1024
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{text}")
    return text, usage.ru_maxrss * 1024


def modelc_run(run, shape, steps, threads, extra=()):
    out = run / "train"
    text, peak = run_measured([
        str(MODELC), "train", str(ROOT / shape["spec"]), "--config", str(run / "config.json"), "--weights",
        str(run / "model.safetensors"), "--batch-file", str(run / "batch.safetensors"), "--steps", str(steps),
        "--lr", "1e-4", "--warmup", "0", "--schedule", "constant", "--weight-decay", "0.1", "--clip", "1.0",
        "--threads", str(threads), "--checkpoint-every", "0",
        "--overwrite", "--out", str(out), *extra,
    ], run)
    if text is None:
        sys.exit(f"modelc was killed for memory at {peak / MIB:.0f} MiB")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "loss" in line]
    return peak, statistics.median(line["seconds"] for line in lines[1:]), [line["loss"] for line in lines]


def torch_run(run, steps, threads, precision="f32"):
    text, peak = run_measured([sys.executable, "-c", TORCH_STEPS, str(run), str(steps), str(threads), precision], run)
    if text is None:
        print(f"  PyTorch was killed for memory at {peak / MIB:.0f} MiB")
        return peak, float("nan"), []
    result = json.loads(text.strip().splitlines()[-1])
    return peak, statistics.median(result["seconds"][1:]), result["losses"]


def planned_arena(run, shape):
    """The training program's planned arena, from `modelc plan` (MB)."""
    out = subprocess.run([
        str(MODELC), "plan", str(ROOT / shape["spec"]), "--config", str(run / "config.json"), "--train",
        "--size", f"B={shape['batch']}", "--size", f"T={shape['seq']}", "-o", str(run / "plan.svg"),
    ], capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"peak ([0-9.,]+) MB", out.stdout + out.stderr)
    return float(found.group(1).replace(",", "")) if found else float("nan")


def prepare(run, shape):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape["family"] == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape["config"]))
    else:
        model = GPT2LMHeadModel(GPT2Config(**shape["config"]))
    model.save_pretrained(run)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids.to(torch.int32)}, run / "batch.safetensors")
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-budget", action="store_true", help="skip the run with --memory-budget at half the plan")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs (modelc and PyTorch autocast)")
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="default: " + ", ".join(DEFAULT_SHAPES))
    args = parser.parse_args()
    rows = []
    for name in args.shape or DEFAULT_SHAPES:
        shape = SHAPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            run = pathlib.Path(tmp)
            params = prepare(run, shape)
            plan = planned_arena(run, shape)
            budget = int(plan * 1e6 / 2)
            ours, theirs, budgeted, ours_bf16, theirs_bf16 = [], [], [], [], []
            for _ in range(args.repeats):
                ours.append(modelc_run(run, shape, args.steps, args.threads))
                theirs.append(torch_run(run, args.steps, args.threads))
                if not args.no_budget:
                    budgeted.append(modelc_run(run, shape, args.steps, args.threads, ["--memory-budget", str(budget)]))
                if not args.no_bf16:
                    ours_bf16.append(modelc_run(run, shape, args.steps, args.threads, ["--precision", "bf16"]))
                    theirs_bf16.append(torch_run(run, args.steps, args.threads, "bf16"))
        m_peak = statistics.median(p for p, _, _ in ours)
        t_peak = statistics.median(p for p, _, _ in theirs)
        m_step = statistics.median(s for _, s, _ in ours)
        t_step = statistics.median(s for _, s, _ in theirs)
        print(f"{name}: {params / 1e6:.1f}M parameters, batch {shape['batch']} x {shape['seq']}, "
              f"{args.threads} threads, {args.steps} steps, {args.repeats} runs each")
        print(f"  peak RSS MiB   modelc {[round(p / MIB) for p, _, _ in ours]}  "
              f"PyTorch {[round(p / MIB) for p, _, _ in theirs]}")
        print(f"  losses         modelc {ours[0][2]}\n                 PyTorch {theirs[0][2]}")
        rows.append((name, m_peak / MIB, t_peak / MIB, m_step, t_step, plan))
        if budgeted:
            # Weights, gradients and AdamW's two moments, f32: the training state the budget leaves out.
            state = params * 4 * 4
            b_peak = statistics.median(p for p, _, _ in budgeted)
            b_step = statistics.median(s for _, s, _ in budgeted)
            print(f"  --memory-budget {budget / 1e6:.1f} MB (half the plan): peak RSS MiB "
                  f"{[round(p / MIB) for p, _, _ in budgeted]}, minus weights, gradients and moments "
                  f"({state / MIB:.0f} MiB): {(b_peak - state) / 1e6:.1f} MB "
                  f"({'within' if b_peak - state <= budget else 'OVER'} the budget); step {b_step:.3f} s "
                  f"against {m_step:.3f} s; losses {'identical' if budgeted[0][2] == ours[0][2] else budgeted[0][2]}")
        if ours_bf16:
            mb_step = statistics.median(s for _, s, _ in ours_bf16)
            tb_step = statistics.median(s for _, s, _ in theirs_bf16)
            mb_peak = statistics.median(p for p, _, _ in ours_bf16)
            tb_peak = statistics.median(p for p, _, _ in theirs_bf16)
            print(f"  bf16 step s    modelc {mb_step:.3f} ({m_step / mb_step:.2f}x its f32 step {m_step:.3f}), "
                  f"PyTorch autocast {tb_step:.3f} ({t_step / tb_step:.2f}x its f32 step {t_step:.3f}); "
                  f"modelc bf16 {tb_step / mb_step:.2f}x PyTorch bf16")
            print(f"  bf16 peak MiB  modelc {mb_peak / MIB:.0f}, PyTorch autocast {tb_peak / MIB:.0f}")
            print(f"  bf16 losses    modelc {ours_bf16[0][2]}\n                 PyTorch {theirs_bf16[0][2]}")
    print(f"\n{'shape':19}{'modelc MiB':>12}{'PyTorch MiB':>13}{'ratio':>8}{'plan MB':>10}"
          f"{'modelc s':>10}{'PyTorch s':>11}")
    for name, m, t, ms, ts, plan in rows:
        print(f"{name:19}{m:>12.0f}{t:>13.0f}{m / t:>7.2f}x{plan:>10.1f}{ms:>10.3f}{ts:>11.3f}")


if __name__ == "__main__":
    main()
