"""Writes the references for one optimiser step and the learning-rate
schedules, from the tiny LLaMA checkpoint tests/hf_fixtures.py wrote.

    pip install torch transformers safetensors
    python3 tests/train_fixtures.py

  tests/fixtures/hf/llama/adamw_step.safetensors
      the weights after one torch.optim.AdamW step (lr 1e-3, betas 0.9/0.95 as
      specs/llama.model's train block, eps 1e-8, weight decay 0.1, no
      clipping) on the language-model loss of inputs.safetensors
  tests/fixtures/padded/{model,inputs,grads}.safetensors
      tests/fixtures/padded/padded.model in PyTorch: nn.Embedding(16, 8,
      padding_idx=0) (its pad row set non-zero, so the forward reads it),
      tanh, nn.Linear(8, 16); the gradients of the next-token loss on a
      batch holding the pad id, as inputs and as targets
  tests/fixtures/hf/bert-mlm/
      a tiny BertForMaskedLM (the bert fixture's sizes and WordPiece
      tokenizer, seeded random weights): config.json, model.safetensors,
      tokenizer.json, inputs.safetensors (input_ids and a padding
      attention_mask) and the logits transformers computes for them
  tests/fixtures/schedules.json
      the learning rate of each of the first 10 optimiser steps under
      transformers' get_cosine_schedule_with_warmup and
      get_linear_schedule_with_warmup (peak 1e-3, 3 warmup steps, 10 steps)
"""

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
import shutil

from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaForCausalLM,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def adamw_step() -> None:
    folder = FIXTURES / "hf" / "llama"
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.train()
    input_ids = load_file(folder / "inputs.safetensors")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(weights, folder / "adamw_step.safetensors")
    print(f"adamw_step: {len(weights)} tensors")


def padded_embedding() -> None:
    out = FIXTURES / "padded"
    embed = torch.nn.Embedding(16, 8, padding_idx=0)
    head = torch.nn.Linear(8, 16)
    with torch.no_grad():
        embed.weight[0] = torch.linspace(-0.5, 0.5, 8)
    input_ids = torch.tensor([[3, 0, 0, 5, 9, 0, 2], [0, 1, 4, 0, 15, 7, 0]])
    logits = head(torch.tanh(embed(input_ids)))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16), input_ids[:, 1:].reshape(-1))
    loss.backward()
    weights = {"embed.weight": embed.weight, "head.weight": head.weight, "head.bias": head.bias}
    save_file({n: p.detach().contiguous() for n, p in weights.items()}, out / "model.safetensors")
    save_file({"input_ids": input_ids}, out / "inputs.safetensors")
    save_file({n: p.grad.contiguous() for n, p in weights.items()}, out / "grads.safetensors")
    assert embed.weight.grad[0].abs().max() == 0
    print(f"padded: loss {loss.item():.6f}")


def bert_mlm() -> None:
    source = FIXTURES / "hf" / "bert"
    out = FIXTURES / "hf" / "bert-mlm"
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        # A visible output bias, so that the test sees it load.
        model.cls.predictions.bias.copy_(torch.linspace(-1.0, 1.0, 384))
    model.save_pretrained(out)
    shutil.copy(source / "tokenizer.json", out / "tokenizer.json")
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 384, (2, 10), generator=g)
    attention_mask = torch.ones(2, 10, dtype=torch.int64)
    input_ids[1, 7:] = 0
    attention_mask[1, 7:] = 0
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    save_file({"input_ids": input_ids, "attention_mask": attention_mask}, out / "inputs.safetensors")
    save_file({"logits": logits.contiguous()}, out / "logits.safetensors")
    print(f"bert-mlm: {sum(p.numel() for p in model.parameters())} parameters")


def schedules() -> None:
    record = {"lr": 1e-3, "warmup": 3, "steps": 10}
    for name, make in [("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=record["lr"])
        schedule = make(optimizer, record["warmup"], record["steps"])
        rates = []
        for _ in range(record["steps"]):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        record[name] = rates
    (FIXTURES / "schedules.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"schedules: {record}")


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(1)
    adamw_step()
    padded_embedding()
    bert_mlm()
    schedules()
