"""Two builds of modelc on the same work, alternating: whether a change kept
the speed. Both binaries run each measure in turn, `--repeats` times, and
the medians and their ratio are printed (head / base: above 1 is faster
for tokens/s, below 1 is faster for seconds).

  - tiny-gpt training step (batch 8 x 128, on the GPL-3 text): seconds a step,
  - tiny-gpt forward: a 128-token prompt read by `infer` (prefill tokens/s),
  - stories15M-shaped LLaMA training step (8 x 256, random weights): seconds,
  - stories15M-shaped greedy decoding (128 tokens after 8): tokens/s.

    bash benches/compare.sh REV        (builds REV and the working tree, runs this)
    python3 benches/compare.py --base PATH [--head target/release/modelc] [--threads 2] [--repeats 5]
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decode import SHAPES, config, weights  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = "/usr/share/common-licenses/GPL-3"


def run(binary, args):
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"{binary} {' '.join(args)} failed:\n{out.stderr}")
    return out


def step_seconds(binary, train_args, out):
    run(binary, ["train", *train_args, "--checkpoint-every", "0", "--overwrite", "--out", str(out)])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in lines if "seconds" in r]
    return statistics.median(seconds[1:])


def timings(binary, infer_args):
    out = run(binary, ["infer", *infer_args, "--temperature", "0", "--json", "--timings"])
    return json.loads(out.stderr.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the modelc binary to compare against")
    ap.add_argument("--head", default=str(ROOT / "target" / "release" / "modelc"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threads = ["--threads", str(args.threads), "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shape = SHAPES["15M"]
        llama = tmp / "llama"
        llama.mkdir()
        save_file(weights(shape), str(llama / "model.safetensors"))
        (llama / "config.json").write_text(json.dumps(config(shape)))
        rng = np.random.default_rng(1)
        save_file({"input_ids": rng.integers(0, 32000, (8, 256)).astype(np.int64)}, str(llama / "batch.safetensors"))
        tiny_weights = tmp / "tiny"
        run(args.head, ["train", "specs/tiny-gpt.model", "--data", TEXT, "--steps", "1", "--out", str(tiny_weights),
                        *threads])
        prompt = ",".join(str(b) for b in (ROOT / "README.md").read_bytes()[:128])
        llama_model = ["specs/llama.model", "--config", str(llama / "config.json")]
        measures = {
            "tiny-gpt training step (s)": lambda b, out: step_seconds(
                b, ["specs/tiny-gpt.model", "--data", TEXT, "--steps", "6", "--batch", "8", "--seq-len", "128",
                    *threads], out),
            "tiny-gpt forward, 128 tokens (tok/s)": lambda b, out: timings(
                b, ["specs/tiny-gpt.model", "--weights", str(tiny_weights / "model.safetensors"), "--prompt-ids",
                    prompt, "--max-new-tokens", "1", *threads])["prefill_tokens_per_s"],
            "stories15M training step 8 x 256 (s)": lambda b, out: step_seconds(
                b, [*llama_model, "--weights", str(llama / "model.safetensors"), "--batch-file",
                    str(llama / "batch.safetensors"), "--steps", "4", "--lr", "1e-4", *threads], out),
            "stories15M decode (tok/s)": lambda b, out: timings(
                b, [*llama_model, "--weights", str(llama / "model.safetensors"), "--prompt-ids", "1,2,3,4,5,6,7,8",
                    "--max-new-tokens", "129", *threads])["decode_tokens_per_s"],
        }
        print(f"base {args.base}\nhead {args.head}\n{args.threads} threads, medians of {args.repeats} alternating runs")
        print(f"{'':40}{'base':>10}{'head':>10}{'head/base':>11}")
        for name, measure in measures.items():
            got = {"base": [], "head": []}
            for i in range(args.repeats):
                for side in ("base", "head") if i % 2 == 0 else ("head", "base"):
                    got[side].append(measure(getattr(args, side), tmp / f"run-{side}"))
            base, head = statistics.median(got["base"]), statistics.median(got["head"])
            print(f"{name:40}{base:>10.3f}{head:>10.3f}{head / base:>10.3f}x", flush=True)


if __name__ == "__main__":
    main()
