"""Writes tiny Qwen2, Gemma, Gemma 2, Qwen3, StableLM and GPT-NeoX checkpoints that
the specs of the same names in specs/ are compared with (transformers' own
models, seeded random weights), and checks the real configurations' parameter
totals.

    pip install torch transformers safetensors
    python3 tests/family_fixtures.py      # rewrites tests/fixtures/hf/{qwen2,gemma,gemma2,qwen3,stablelm,stablelm-parallel,gpt-neox}/
    python3 tests/family_fixtures.py gemma2   # only the families named

For each, under tests/fixtures/hf/NAME/:
  config.json, model.safetensors     save_pretrained()
  inputs.safetensors                 input_ids [2, 12]
  logits.safetensors                 the logits transformers computes for them
  grads.safetensors                  gradients of its LM loss, by weight name
  generate.json                      greedy generate() for two prompts, 20 new tokens each

Qwen2 has untied output weights and q/k/v biases (o_proj none); Gemma ties
them, has a head size (16) other than dim / heads (8), one key/value head
and padding row 0 (no gradient); Gemma 2 as Gemma with two key/value
heads, a 4-token sliding window on its first layer (not its second),
attention scores soft-capped at 1.5 and logits at 3.0 (small, so that
tanh bends them), queries scaled by 24^-1/2 rather than 16^-1/2, and a
norm after each sub-layer; Qwen3 ties them, normalises each head's
queries and keys (q_norm, k_norm), has a head size of its own (16) and
biases on all four attention projections; StableLM has LayerNorms with
biases, RoPE on half of each head (8 features) and q/k/v biases, and
stablelm-parallel the same with the parallel residual (one norm read by
attention and MLP); GPT-NeoX has a fused query_key_value projection laid
out head by head, RoPE on half of each head, and the parallel residual
with a norm for each branch. Biases and norm weights are drawn at
random too (transformers starts them at 0 and 1), so that each is seen.

tests/fixtures/configs/{qwen2-0.5b,gemma-2b,gemma-2-2b,qwen3-0.6b,stablelm-3b-4e1t,pythia-410m}.json are the published
configurations; their totals (printed here, with transformers' model built
on the meta device) are the ones tests/specs.rs expects.
"""

import json
import pathlib

import torch
import sys

from transformers import (AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, GemmaConfig,
                          GemmaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, StableLmConfig, StableLmForCausalLM,
                          GPTNeoXConfig, GPTNeoXForCausalLM)

from window_fixtures import greedy_cases, save_logits_and_grads

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE / "fixtures" / "hf"
VOCAB = 64
NEW_TOKENS = 20


def qwen2():
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        initializer_range=0.2, tie_word_embeddings=False, use_sliding_window=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def gemma():
    config = GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
        initializer_range=0.2, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=None,
        eos_token_id=None,
    )
    return GemmaForCausalLM(config)


def gemma2():
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=4,
        query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=3.0, initializer_range=0.2,
        hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config)


def qwen3():
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=True, initializer_range=0.2, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return Qwen3ForCausalLM(config)


def stablelm(parallel=False):
    config = StableLmConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, layer_norm_eps=1e-5, partial_rotary_factor=0.5,
        rope_theta=10000.0, use_qkv_bias=True, use_parallel_residual=parallel, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return StableLmForCausalLM(config)


def gpt_neox():
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, layer_norm_eps=1e-5, rotary_pct=0.5, rotary_emb_base=10000.0,
        use_parallel_residual=True, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )
    return GPTNeoXForCausalLM(config)


def write(name, model):
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n:
                p.add_(torch.randn(p.shape) * 0.2)
            elif name == "gemma" and "layers" in n:
                # Tied, scaled embeddings otherwise outweigh the layers: each
                # token would predict itself.
                p.mul_(3.0)
            if name == "gemma2" and "post_" in n:
                p.add_(3.0)  # the same, for sub-layers whose outputs are normalised
    model.eval()
    model.save_pretrained(out)
    input_ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    input_ids[0, 3] = 0  # the padding token, as a token: its row gets no gradient
    save_logits_and_grads(model, input_ids, out)
    cases = greedy_cases(model, (3, 9), NEW_TOKENS, low=1)
    (out / "generate.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, generated {cases}")


def published_totals():
    for file in ("qwen2-0.5b.json", "gemma-2b.json", "gemma-2-2b.json", "qwen3-0.6b.json", "stablelm-3b-4e1t.json", "pythia-410m.json"):
        config = AutoConfig.from_pretrained(HERE / "fixtures" / "configs" / file)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        print(f"{file}: {sum(p.numel() for p in model.parameters()):,} parameters")


FAMILIES = {
    "qwen2": qwen2,
    "gemma": gemma,
    "gemma2": gemma2,
    "qwen3": qwen3,
    "stablelm": stablelm,
    "stablelm-parallel": lambda: stablelm(parallel=True),
    "gpt-neox": gpt_neox,
}


def main():
    torch.set_num_threads(1)
    for name in sys.argv[1:] or FAMILIES:
        torch.manual_seed(0)
        write(name, FAMILIES[name]())
    published_totals()


if __name__ == "__main__":
    main()
