"""Batch-1 inference: modelc against llama.cpp on the same random LLaMA
weights (tied embeddings), the same threads, in one run.

For each shape (stories15M: dim 288, 6 layers; stories110M: dim 768, 12
layers; vocab 32,000) and each weight format (f32, bf16, q8 / Q8_0, q4 /
Q4_0) it measures

  - decode (tg): greedy tokens per second after a short prompt,
  - prefill (pp): tokens per second reading a 256-token prompt,

alternating the two tools, and prints medians, ratios, the bandwidth
modelc's decode reaches (bytes of weights read per token x tokens/s)
against the machine's read bandwidth on the same threads (measured here:
numpy dot products over 512 MiB, one slice a thread), and modelc's JIT
time for the prompt and the token programs.

    bash benches/decode.sh            (installs the peers, builds, runs this)
    python3 benches/decode.py [--threads 2] [--repeats 3] [--shapes 15M,110M] [--formats f32,q8]
                              [--kv-cache f16|f32]

Both tools keep the key/value cache as `--kv-cache` says: f16 (the
default, llama.cpp's own) or f32.

llama.cpp runs through llama-cpp-python (built from source by pip); its
own counters (llama_perf_context) give its times, so Python's overhead is
not counted against it. modelc's times come from `infer --timings`.
"""

import os

# One BLAS thread per Python thread in the read-bandwidth measurement
# (before numpy is imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ctypes
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELC = ROOT / "target" / "release" / "modelc"
SHAPES = {
    "15M": dict(dim=288, layers=6, heads=6, hidden=768),
    "110M": dict(dim=768, layers=12, heads=12, hidden=2048),
}
VOCAB = 32000
PROMPT, NEW = 256, 128
FORMATS = {"f32": "F32", "bf16": "BF16", "q8": "Q8_0", "q4": "Q4_0"}


def weights(shape, seed=0):
    """Random LLaMA weights with Hugging Face names (tied embeddings)."""
    rng = np.random.default_rng(seed)
    d, h = shape["dim"], shape["hidden"]

    def w(*s):
        return (rng.standard_normal(s) * 0.02).astype(np.float32)

    t = {"model.embed_tokens.weight": w(VOCAB, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = w(d, d)
        t[p + "mlp.gate_proj.weight"] = w(h, d)
        t[p + "mlp.up_proj.weight"] = w(h, d)
        t[p + "mlp.down_proj.weight"] = w(d, h)
        t[p + "input_layernorm.weight"] = np.ones(d, np.float32) + w(d)
        t[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32) + w(d)
    return t


def config(shape):
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=shape["dim"],
        intermediate_size=shape["hidden"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"], max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def write_gguf(path, shape, t, fmt):
    """The same weights as GGUF, named and laid out as llama.cpp's converter does
    (q and k rows permuted for its RoPE), 2-D weights in `fmt`."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, FORMATS[fmt])
    heads = shape["heads"]
    out = gguf.GGUFWriter(str(path), "llama")
    out.add_name("bench")
    out.add_context_length(1024)
    out.add_embedding_length(shape["dim"])
    out.add_block_count(shape["layers"])
    out.add_feed_forward_length(shape["hidden"])
    out.add_head_count(heads)
    out.add_head_count_kv(heads)
    out.add_layer_norm_rms_eps(1e-5)
    out.add_rope_freq_base(10000.0)
    out.add_rope_dimension_count(shape["dim"] // heads)
    out.add_vocab_size(VOCAB)
    # A sentencepiece-style vocabulary: specials, the 256 byte tokens, then filler pieces.
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"tok{i}".encode() for i in range(VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259)
    out.add_tokenizer_model("llama")
    out.add_token_list(tokens)
    out.add_token_scores([0.0] * VOCAB)
    out.add_token_types(types)
    out.add_bos_token_id(1)
    out.add_eos_token_id(2)

    def permute(w):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def add(name, w):
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            out.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            out.add_tensor(name, w)

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(t[p + "self_attn.q_proj.weight"]))
        add(f"blk.{i}.attn_k.weight", permute(t[p + "self_attn.k_proj.weight"]))
        add(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"])
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API, timed by its own counters."""

    def __init__(self, path, threads, kv_cache):
        import llama_cpp

        self.lib = llama_cpp
        # Quiet: llama.cpp logs every load to stderr.
        self.quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(self.quiet, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
            # llama.cpp's AMX kernels crash on the first Q8_0/Q4_0 product on
            # the Xeon VMs we have (ggml-org/llama.cpp#20824: a segfault in
            # ggml_backend_amx_mul_mat; permission for the tile state does
            # not help). Without the extra buffer types it runs, on AVX-512
            # VNNI, but also without its repacked Q4_0 layout.
            mp.use_extra_bufts = False
            print("llama.cpp: AMX_INT8 build, extra buffer types (AMX, repack) off", file=sys.stderr)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = 1024
        cp.n_batch = 512
        cp.n_ubatch = 512
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = False
        # ggml's type ids: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1.
        cp.type_k = cp.type_v = {"f32": 0, "f16": 1}[kv_cache]
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.vocab = VOCAB

    def run(self, prompt, new):
        """Greedy: the prompt in one batch, then `new` tokens one at a time.
        Returns (prefill tokens/s, decode tokens/s, tokens)."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        lib.llama_perf_context_reset(self.ctx)
        arr = (lib.llama_token * len(prompt))(*prompt)
        if lib.llama_decode(self.ctx, lib.llama_batch_get_one(arr, len(prompt))) != 0:
            sys.exit("llama_decode failed on the prompt")
        out = []
        for _ in range(new):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,))
            tok = int(np.argmax(logits))
            out.append(tok)
            one = (lib.llama_token * 1)(tok)
            if lib.llama_decode(self.ctx, lib.llama_batch_get_one(one, 1)) != 0:
                sys.exit("llama_decode failed")
        perf = lib.llama_perf_context(self.ctx)
        pp = perf.n_p_eval / (perf.t_p_eval_ms / 1e3) if perf.t_p_eval_ms > 0 else 0.0
        tg = perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else 0.0
        return pp, tg, out

    def close(self):
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def modelc(folder, fmt, prompt, new, threads, kv_cache):
    """(prefill tokens/s, decode tokens/s, JIT seconds, tokens) from one `infer` run."""
    ids = ",".join(map(str, prompt))
    cmd = [str(MODELC), "infer", "specs/llama.model", "--config", str(folder / "config.json"), "--weights",
           str(folder / "model.safetensors"), "--prompt-ids", ids, "--max-new-tokens", str(new + 1),
           "--temperature", "0", "--threads", str(threads), "--device", "cpu", "--dtype", fmt, "--kv-cache", kv_cache, "--json",
           "--timings"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"modelc failed:\n{out.stderr}")
    t = json.loads(out.stderr.strip().splitlines()[-1])
    tokens = json.loads(out.stdout)["new_token_ids"]
    return t["prefill_tokens_per_s"], t["decode_tokens_per_s"], t["compile_s"], tokens


def copy_bandwidth():
    """GB/s of a large copy (read + write) with numpy: the machine's memory bound."""
    a = np.ones(64 << 20, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        s = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - s)
    return 2 * a.nbytes / min(times) / 1e9


def read_bandwidth(threads):
    """GB/s the machine reads on `threads` threads: each a dot product of its
    slice of 512 MiB with itself (a read of each byte once), best of 5."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(128 << 20, np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            s = time.perf_counter()
            list(pool.map(lambda p: float(np.dot(p, p)), parts))
            best = min(best, time.perf_counter() - s)
    return a.nbytes / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="15M,110M")
    ap.add_argument("--formats", default="f32,bf16,q8,q4")
    ap.add_argument("--kv-cache", default="f16", choices=["f16", "f32"])
    args = ap.parse_args()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, prompt {PROMPT}, {NEW} new tokens")
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write, numpy, 1 thread): {bw:.1f} GB/s")
    read = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads, numpy dot): {read:.1f} GB/s")
    rows = []
    rng = np.random.default_rng(1)
    prompt = [int(x) for x in rng.integers(3, VOCAB, PROMPT)]
    short = prompt[:8]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            folder = pathlib.Path(tmp) / name
            folder.mkdir()
            t = weights(shape)
            from safetensors.numpy import save_file

            save_file(t, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(config(shape)))
            n_weights = sum(v.size for k, v in t.items())
            for fmt in args.formats.split(","):
                gg = folder / f"{fmt}.gguf"
                write_gguf(gg, shape, t, fmt)
                peer = LlamaCpp(gg, args.threads, args.kv_cache)
                m_pp, m_tg, l_pp, l_tg, jit = [], [], [], [], []
                for _ in range(args.repeats):
                    # Decode after a short prompt; prefill of the long one.
                    _, tg, _ = peer.run(short, NEW)
                    pp, _, _ = peer.run(prompt, 1)
                    l_tg.append(tg)
                    l_pp.append(pp)
                    _, tg, c, _ = modelc(folder, fmt, short, NEW, args.threads, args.kv_cache)
                    pp, _, _, _ = modelc(folder, fmt, prompt, 1, args.threads, args.kv_cache)
                    m_tg.append(tg)
                    m_pp.append(pp)
                    jit.append(c)
                peer.close()
                med = statistics.median
                row = dict(shape=name, fmt=fmt, tg=med(m_tg), tg_peer=med(l_tg), pp=med(m_pp), pp_peer=med(l_pp),
                           jit=med(jit))
                # Bytes of weights one token reads (the tied embedding is read once, as the output layer).
                per = {"f32": 4, "bf16": 2, "q8": 34 / 32, "q4": 18 / 32}[fmt]
                row["gbs"] = row["tg"] * n_weights * per / 1e9
                row["read_gbs"] = read
                rows.append(row)
                print(
                    f"{name:>5} {fmt:>4}  decode {row['tg']:8.1f} vs {row['tg_peer']:8.1f} tok/s ({row['tg'] / row['tg_peer']:.2f}x, "
                    f"{row['gbs']:.1f} GB/s of weights, {row['gbs'] / read:.0%} of read)  prefill {row['pp']:8.1f} vs {row['pp_peer']:8.1f} tok/s "
                    f"({row['pp'] / row['pp_peer']:.2f}x)  JIT {row['jit'] * 1e3:.0f} ms",
                    flush=True,
                )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
