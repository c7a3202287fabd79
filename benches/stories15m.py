"""modelc against PyTorch (eager, CPU) on the LLaMA spec at the stories15M
shape: dim 288, 6 layers, 6 heads, hidden 768, vocab 32000. Both run the
same weights on the same threads, in this one run:

  1. a training step (forward + backward + AdamW) on a batch of 8 x 256,
  2. greedy decoding of 256 tokens (transformers' generate with its KV cache
     against `modelc infer`), and modelc without its cache.

    pip install torch transformers
    cargo build --release && python3 benches/stories15m.py [--threads 2]

Prints medians and the ratios; docs/cpu.md keeps the results.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELC = ROOT / "target" / "release" / "modelc"
SHAPE = dict(
    vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
    num_key_value_heads=6, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
BATCH, SEQ, NEW_TOKENS = 8, 256, 256


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_train_step(model, ids, repeats, bf16=False):
    """The median of `repeats` steps after a first; `bf16`: the forward under
    bf16 autocast (mixed precision, as modelc's `--precision bf16`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up
    return median_time(step, repeats)


def torch_decode(model, prompt, repeats):
    ids = torch.tensor([prompt])

    def generate():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    generate()
    return median_time(generate, repeats)


def modelc(args):
    out = subprocess.run([str(MODELC), *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"modelc {' '.join(args)} failed:\n{out.stderr}")
    return out


def modelc_train_step(run, threads, steps):
    out = run / "train"
    modelc([
        "train", "specs/llama.model", "--config", str(run / "config.json"), "--weights", str(run / "model.safetensors"),
        "--batch-file", str(run / "batch.safetensors"), "--steps", str(steps), "--lr", "1e-4", "--clip", "1.0",
        "--threads", str(threads), "--checkpoint-every", "0", "--out", str(out),
    ])
    seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(seconds[1:])


def modelc_decode(run, threads, prompt, repeats, cache=True):
    def once():
        out = modelc([
            "infer", "specs/llama.model", "--config", str(run / "config.json"), "--weights",
            str(run / "model.safetensors"), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
            str(NEW_TOKENS), "--temperature", "0", "--context", "512", "--threads", str(threads), "--json",
            *([] if cache else ["--no-cache"]),
        ])
        # "N tokens in S s, ...": decoding time without start-up and compilation.
        words = out.stderr.split()
        return float(words[words.index("tokens") + 2]), json.loads(out.stdout)["new_token_ids"]

    runs = [once() for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[0][1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    prompt = ids[0, :8].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        run = pathlib.Path(tmp)
        model.save_pretrained(run)
        save_file({"input_ids": ids}, run / "batch.safetensors")
        print(f"stories15M shape: {params / 1e6:.1f}M parameters, {args.threads} threads, torch {torch.__version__}")

        model.eval()
        t_dec, want = None, None
        t_dec = torch_decode(model, prompt, args.repeats)
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)[0, len(prompt):].tolist()
        m_dec, got = modelc_decode(run, args.threads, prompt, args.repeats)
        m_nocache, _ = modelc_decode(run, args.threads, prompt, max(1, args.repeats // 2), cache=False)
        same = sum(a == b for a, b in zip(got, want))

        model.train()
        t_step = torch_train_step(model, ids, args.repeats)
        m_step = modelc_train_step(run, args.threads, args.repeats + 1)

    print(f"{'':34}{'modelc':>10}{'PyTorch':>10}{'speed-up':>10}")
    print(f"{'training step 8 x 256 (s)':34}{m_step:>10.3f}{t_step:>10.3f}{t_step / m_step:>9.2f}x")
    print(f"{'greedy decode 256 tokens (tok/s)':34}{NEW_TOKENS / m_dec:>10.1f}{NEW_TOKENS / t_dec:>10.1f}"
          f"{t_dec / m_dec:>9.2f}x")
    print(f"{'  modelc without the KV cache':34}{NEW_TOKENS / m_nocache:>10.1f}{'':>10}"
          f"{m_nocache / m_dec:>9.2f}x  (cache speed-up)")
    print(f"greedy tokens equal to transformers': {same}/{NEW_TOKENS}")


if __name__ == "__main__":
    main()
