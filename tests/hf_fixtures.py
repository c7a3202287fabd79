"""Writes the tiny Hugging Face checkpoints the integration tests compare with.

    pip install torch transformers tokenizers safetensors
    python3 tests/hf_fixtures.py            # rewrites tests/fixtures/hf/

For each language model (gpt2, llama) it writes, under tests/fixtures/hf/NAME/:
  config.json, model.safetensors     save_pretrained() of a seeded random model
  tokenizer.json                     a byte-level BPE trained on the GPL-3 text
  inputs.safetensors                 input_ids [2, 12] (int64)
  logits.safetensors                 the logits transformers computes for them
  grads.safetensors                  gradients of its LM loss on them, by weight name
  generate.json                      prompt, prompt ids and greedy generate() ids

For PEFT (llama-lora, llama-dora): adapter_config.json and
adapter_model.safetensors on the tiny LLaMA, the adapted logits, and the
weights merge_and_unload() gives.

For the encoder (bert, a tiny all-MiniLM-style BertModel) it writes
config.json, model.safetensors, tokenizer.json (WordPiece), inputs and
last_hidden_state for a padded batch, and embeddings.json: mean-pooled,
L2-normalised sentence embeddings as sentence-transformers computes them.

Weights are drawn with a large initializer range so that logits are far from
uniform and greedy decoding does not hinge on near-ties.
"""

import json
import os
import pathlib

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
CORPUS = "/usr/share/common-licenses/GPL-3"
VOCAB = 384
PROMPT = "This License"
NEW_TOKENS = 24


def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train([CORPUS], trainer)
    return tok


SENTENCES = ["This License applies to any program.", "Free software is a matter of liberty.", "Hello"]


def wordpiece() -> Tokenizer:
    """A BERT-style tokenizer: lower-cased WordPiece, [CLS] ... [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train([CORPUS], trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tok


def write_encoder(name: str, tok: Tokenizer) -> None:
    """A tiny BertModel, and sentence embeddings as sentence-transformers
    makes them: mean over the attention mask, then L2-normalised."""
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
    )
    model = BertModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    encodings = tok.encode_batch(SENTENCES)
    longest = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (longest - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (longest - len(e.ids)) for e in encodings])
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
    save_file({"input_ids": ids, "attention_mask": mask}, out / "inputs.safetensors")
    save_file({"last_hidden_state": states.contiguous()}, out / "outputs.safetensors")
    weights = mask.unsqueeze(-1).float()
    pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    records = [{"text": t, "embedding": e.tolist()} for t, e in zip(SENTENCES, pooled)]
    (out / "embeddings.json").write_text(json.dumps(records) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {len(SENTENCES)} sentences embedded")


def write_adapters(tok: Tokenizer) -> None:
    """PEFT LoRA and DoRA adapters on the tiny LLaMA (random, non-zero B so
    that they change the output), the adapted logits, and the weights that
    merge_and_unload() folds them into."""
    from peft import LoraConfig, get_peft_model

    base_dir = ROOT / "llama"
    from safetensors.torch import load_file

    input_ids = load_file(base_dir / "inputs.safetensors")["input_ids"]
    for name, dora in [("llama-lora", False), ("llama-dora", True)]:
        torch.manual_seed(0)
        base = LlamaForCausalLM.from_pretrained(base_dir).eval()
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_dora=dora,
            init_lora_weights=False, task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config).eval()
        out = ROOT / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "../llama"
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        adapter = sum(p.numel() for n, p in model.state_dict().items() if "lora" in n)
        with torch.no_grad():
            logits = model(input_ids).logits
        save_file({"logits": logits.contiguous()}, out / "logits.safetensors")
        merged = model.merge_and_unload()
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / "merged.safetensors")
        print(f"{name}: adapter of {adapter} parameters")


def gpt2() -> torch.nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def llama() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def write(name: str, model: torch.nn.Module, tok: Tokenizer) -> None:
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        logits = model(input_ids).logits
    save_file({"input_ids": input_ids}, out / "inputs.safetensors")
    save_file({"logits": logits.contiguous()}, out / "logits.safetensors")
    # Gradients of the language-model loss on the same batch (no dropout).
    model.zero_grad()
    model(input_ids, labels=input_ids).loss.backward()
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters()}
    save_file(grads, out / "grads.safetensors")
    prompt_ids = tok.encode(PROMPT).ids
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    new_ids = generated[0, len(prompt_ids):].tolist()
    record = {"prompt": PROMPT, "prompt_ids": prompt_ids, "new_token_ids": new_ids, "text": tok.decode(new_ids)}
    (out / "generate.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, generated {new_ids}")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = tokenizer()
    write("gpt2", gpt2(), tok)
    torch.manual_seed(0)
    write("llama", llama(), tok)
    torch.manual_seed(0)
    write_encoder("bert", wordpiece())
    write_adapters(tok)


if __name__ == "__main__":
    main()
