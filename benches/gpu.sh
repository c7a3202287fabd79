#!/usr/bin/env bash
# GPU figures for docs/gpu.md, on a machine with a real GPU (about 3 minutes):
#   1. matmul GFLOP/s at 4096^3 (kernels alone), and PyTorch's fp32 matmul
#      with TF32 off on the same GPU when torch with CUDA is importable;
#   2. LLaMA at the stories15M shape and at a 110M shape (dim 768, 12 layers,
#      12 heads, hidden 2048): a training step (batch 8 x 256, AdamW) and
#      greedy decoding of 256 tokens, on --device gpu.
# Needs only cargo and python3 (the standard library writes the inputs). On a
# machine without cargo, give binaries built elsewhere: MODELC=path/modelc
# GPU_MATMUL=path/gpu_matmul (`cargo bench --no-run --bench gpu_matmul`).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
if [ -z "${MODELC:-}" ]; then
    cargo build --release --bin modelc --bench gpu_matmul -q 2>/dev/null || cargo build --release --bin modelc
fi
modelc=${MODELC:-target/release/modelc}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== matmul"
if [ -n "${GPU_MATMUL:-}" ]; then
    "$GPU_MATMUL" 1024 4096
else
    cargo bench -q -p modelc-runtime --bench gpu_matmul -- 1024 4096
fi
python3 - 2>/dev/null <<'PY' || echo "PyTorch: not importable with CUDA here"
import time, torch
assert torch.cuda.is_available()
torch.backends.cuda.matmul.allow_tf32 = False
n = 4096
a, b = torch.rand(n, n, device="cuda"), torch.rand(n, n, device="cuda")
for _ in range(3):
    a @ b
torch.cuda.synchronize()
times = []
for _ in range(5):
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    times.append((time.perf_counter() - start) / 10)
times.sort()
print(f"PyTorch {torch.__version__} fp32 (TF32 off) matmul {n}^3 on {torch.cuda.get_device_name()}: {2 * n**3 / times[2] / 1e9:.1f} GFLOP/s")
PY

for shape in "stories15m 288 6 6 768" "llama110m 768 12 12 2048"; do
    set -- $shape
    name=$1; dir="$work/$name"; mkdir -p "$dir"
    python3 - "$dir" "$2" "$3" "$4" "$5" <<'PY'
import json, random, struct, sys
out, dim, layers, heads, hidden = sys.argv[1], *map(int, sys.argv[2:])
json.dump({"vocab_size": 32000, "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "intermediate_size": hidden, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": False}, open(f"{out}/config.json", "w"))
random.seed(0)
ids = [random.randrange(32000) for _ in range(8 * 256)]
header = json.dumps({"input_ids": {"dtype": "I64", "shape": [8, 256], "data_offsets": [0, 8 * len(ids)]}}).encode()
header += b" " * (-len(header) % 8)
with open(f"{out}/batch.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + struct.pack(f"<{len(ids)}q", *ids))
PY
    echo "== $name (dim $2, $3 layers, hidden $5)"
    if ! "$modelc" train specs/llama.model --config "$dir/config.json" --batch-file "$dir/batch.safetensors" \
        --steps 4 --device gpu --checkpoint-every 0 --out "$dir/run" > "$dir/train.log" 2>&1; then
        grep -E "×|│" "$dir/train.log"
        continue
    fi
    grep -E "device|weights" "$dir/train.log"
    python3 - "$dir/run/metrics.jsonl" <<'PY'
import json, statistics, sys
seconds = [json.loads(l)["seconds"] for l in open(sys.argv[1]) if "seconds" in l]
print(f"training step 8 x 256: {statistics.median(seconds[1:]):.3f} s (median of steps 2-{len(seconds)})")
PY
    "$modelc" infer specs/llama.model --config "$dir/config.json" --weights "$dir/run/model.safetensors" \
        --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 256 --temperature 0 --device gpu --json 2>&1 >/dev/null \
        | grep -E "tokens/s" | sed 's/^/greedy decoding: /'
done

echo "== tiny-gpt: 30 training steps on the GPU against the CPU (the same losses to 1e-3)"
head -c 200000 /usr/share/common-licenses/GPL-3 > "$work/gpl.txt" 2>/dev/null || python3 -c "print('the quick brown fox. ' * 10000)" > "$work/gpl.txt"
for device in cpu gpu; do
    "$modelc" train specs/tiny-gpt.model --data "$work/gpl.txt" --steps 30 --eval-every 10 --device "$device" \
        --out "$work/tiny-$device" 2>&1 | grep -E "^E0|error" || true
done
python3 - "$work/tiny-cpu/metrics.jsonl" "$work/tiny-gpu/metrics.jsonl" <<'PY'
import json, statistics, sys
runs = [[json.loads(l) for l in open(p) if '"loss"' in l] for p in sys.argv[1:]]
diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(*runs))
cpu, gpu = (statistics.median(r["seconds"] for r in run[1:]) for run in runs)
print(f"{len(runs[1])} steps, largest loss difference {diff:.2e}; step {cpu * 1e3:.1f} ms on the CPU, {gpu * 1e3:.1f} ms on the GPU")
PY
