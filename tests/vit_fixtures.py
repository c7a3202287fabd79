"""Writes a tiny Vision Transformer checkpoint that specs/vit.model is compared
with (transformers' ViTForImageClassification, seeded random weights).

    pip install torch transformers safetensors
    python3 tests/vit_fixtures.py      # rewrites tests/fixtures/hf/vit/

Under tests/fixtures/hf/vit/:
  config.json, model.safetensors     save_pretrained(): 8 x 8 images of 3 channels,
                                     4 x 4 patches, width 32, 2 layers, 5 classes
  inputs.safetensors                 pixel_values [4, 3, 8, 8]
  examples.safetensors               the same with labels [4] (what `modelc train --data` reads)
  logits.safetensors                 the logits transformers computes for them
  grads.safetensors                  gradients of its classification loss, by weight name

Three channels and non-square kernels' worth of positions make a wrong
patch order or channel order show; norm weights and biases are drawn at
random too (transformers starts them at 1 and 0).
"""

import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

ROOT = pathlib.Path(__file__).parent / "fixtures" / "hf" / "vit"


# transformers 5 names ViT's modules anew but saves them under the old names.
SAVED_AS = [(".layers.", ".encoder.layer."), (".attention.q_proj.", ".attention.attention.query."),
            (".attention.k_proj.", ".attention.attention.key."), (".attention.v_proj.", ".attention.attention.value."),
            (".attention.o_proj.", ".attention.output.dense."), (".mlp.fc1.", ".intermediate.dense."),
            (".mlp.fc2.", ".output.dense.")]


def checkpoint_grads(model, saved):
    """The gradients by the names the checkpoint saves, each weight checked
    against the saved one."""
    grads = {}
    for name, p in model.named_parameters():
        key = name
        for new, old in SAVED_AS:
            key = key.replace(new, old)
        assert torch.equal(saved[key], p.detach()), key
        grads[key] = p.grad.contiguous()
    assert sorted(grads) == sorted(saved), "every saved weight has its gradient"
    return grads


def main():
    torch.manual_seed(0)
    ROOT.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5,
        initializer_range=0.2,
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(ROOT)
    pixels = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 3, 4, 1])
    save_file({"pixel_values": pixels}, ROOT / "inputs.safetensors")
    save_file({"pixel_values": pixels, "labels": labels}, ROOT / "examples.safetensors")
    model.eval()
    with torch.no_grad():
        logits = model(pixels).logits
    save_file({"logits": logits.contiguous()}, ROOT / "logits.safetensors")
    model.zero_grad()
    model(pixels, labels=labels).loss.backward()
    save_file(checkpoint_grads(model, load_file(ROOT / "model.safetensors")), ROOT / "grads.safetensors")


if __name__ == "__main__":
    main()
