"""Writes the tiny Mixtral and Mistral checkpoints the expert and sliding-window
tests compare with (transformers' own models, seeded random weights).

    pip install torch transformers safetensors
    python3 tests/window_fixtures.py      # rewrites tests/fixtures/hf/{mixtral,mistral}/

mixtral/ (4 experts, 2 chosen per token; no load-balancing loss, which
transformers pools over all layers rather than per layer):
  config.json, model.safetensors     save_pretrained() (per-expert w1/w2/w3 names)
  inputs.safetensors                 input_ids [2, 12]
  logits.safetensors                 the logits transformers computes for them
  grads.safetensors                  gradients of its LM loss, by checkpoint weight name

mixtral-ties/: the same model with every router weight zero, so that each
token's experts tie and torch.topk's order of equal values decides which
two run (experts 2 and 3 of 4); its logits and gradients as above.

mistral/ (a sliding window of 6 positions):
  config.json, model.safetensors
  generate.json                      greedy generate() for a prompt shorter and one
                                     longer than the window, each 30 new tokens (5 windows)
"""

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
VOCAB = 64
NEW_TOKENS = 30


# Modules transformers 5 names otherwise than the checkpoints it saves.
SAVED_AS = {"lm_head.weight": "embed_out.weight"}  # GPT-NeoX's output layer


def checkpoint_grads(model, saved):
    """The gradients by checkpoint name: transformers keeps each layer's
    experts fused (`mlp.experts.gate_up_proj` [E, 2H, D], `down_proj`
    [E, D, H]) and saves them per expert (`block_sparse_moe.experts.e.w1`,
    `w3`, `w2`), and saves a few modules under their old names
    (`SAVED_AS`); each is checked against the saved weights."""
    grads = {}
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            layer = name.split(".mlp.")[0]
            for e in range(p.shape[0]):
                prefix = f"{layer}.block_sparse_moe.experts.{e}"
                if name.endswith("gate_up_proj"):
                    h = p.shape[1] // 2
                    parts = {"w1": (p[e, :h], p.grad[e, :h]), "w3": (p[e, h:], p.grad[e, h:])}
                else:
                    parts = {"w2": (p[e], p.grad[e])}
                for w, (value, grad) in parts.items():
                    key = f"{prefix}.{w}.weight"
                    assert torch.equal(saved[key], value.detach()), key
                    grads[key] = grad.contiguous()
        else:
            key = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            key = key if key in saved else SAVED_AS.get(key, key)
            assert torch.equal(saved[key], p.detach()), key
            grads[key] = p.grad.contiguous()
    assert sorted(grads) == sorted(saved), "every saved weight has its gradient"
    return grads


def mixtral(name="mixtral", tied=False):
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, initializer_range=0.2, router_aux_loss_coef=0.0, output_router_logits=False,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = MixtralForCausalLM(config).eval()
    if tied:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.zero_()
    model.save_pretrained(out)
    save_logits_and_grads(model, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1)), out)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")


def save_logits_and_grads(model, input_ids, out):
    """The inputs, the logits transformers computes for them and the
    gradients of its LM loss by checkpoint name, beside the saved model."""
    with torch.no_grad():
        logits = model(input_ids).logits
    save_file({"input_ids": input_ids}, out / "inputs.safetensors")
    save_file({"logits": logits.contiguous()}, out / "logits.safetensors")
    model.zero_grad()
    model(input_ids, labels=input_ids).loss.backward()
    save_file(checkpoint_grads(model, load_file(out / "model.safetensors")), out / "grads.safetensors")


def greedy_cases(model, lengths, new_tokens, low):
    """Greedy generate() for a random prompt of each length (ids from `low`),
    as {prompt_ids, new_token_ids} records."""
    g = torch.Generator().manual_seed(2)
    cases = []
    for length in lengths:
        prompt = torch.randint(low, model.config.vocab_size, (1, length), generator=g)
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        cases.append({"prompt_ids": prompt[0].tolist(), "new_token_ids": generated[0, length:].tolist()})
    return cases


def mistral():
    out = ROOT / "mistral"
    out.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
        sliding_window=6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(out)
    cases = greedy_cases(model, (3, 20), NEW_TOKENS, low=0)
    (out / "generate.json").write_text(json.dumps({"window": 6, "cases": cases}, indent=1) + "\n")
    print(f"mistral: {sum(p.numel() for p in model.parameters())} parameters, generated {cases}")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mixtral()
    torch.manual_seed(0)
    mistral()
    torch.manual_seed(0)
    mixtral("mixtral-ties", tied=True)


if __name__ == "__main__":
    main()
