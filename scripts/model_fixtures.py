#!/usr/bin/env python3
"""Builds the tiny Hugging Face checkpoints and the transformers reference values that the
model crate's parity tests compare against (model/tests/fixtures/hf/).

Needs torch and transformers (not needed by CI, which only reads the committed output):

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.15.0 transformers==5.23.0
    .venv-torch/bin/python scripts/model_fixtures.py            # (re)writes the fixtures
    .venv-torch/bin/python scripts/model_fixtures.py --check-export DIR NAME
        # loads an exported directory (flywheel weights export) in transformers and checks its
        # log-probs on NAME's reference tokens

Every parameter is re-randomised (norm scales and biases included): the default init sets
norms to 1 and biases to 0, which would hide a bug in how they are applied.
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "model", "tests", "fixtures", "hf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "What is 12 + 30? The answer is 42.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "def add(a, b):\n    return a + b\n",
    "Hello world! Flywheel trains language models with reinforcement learning.",
    "Ünïcödé, emoji 🙂 and tabs\tstay bytes.",
]
MESSAGES = [
    {"role": "user", "content": "What is 7 * 6?  "},
    {"role": "assistant", "content": "42"},
]


def build_tokenizer(out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    return fast


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


CONFIGS = {
    # Llama: grouped-query attention, attention and MLP biases, Llama 3 RoPE scaling, untied;
    # sharded into several files, config.json rewritten in the transformers 4 layout.
    "llama": lambda v: LlamaConfig(
        vocab_size=v, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    ),
    # Qwen2: q/k/v biases, GQA, tied embeddings, a vocabulary padded past the tokenizer's.
    "qwen2": lambda v: Qwen2Config(
        vocab_size=v + 12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
    ),
    # Qwen3: explicit head_dim (not hidden / heads), q_norm / k_norm, untied.
    "qwen3": lambda v: Qwen3Config(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    ),
}


def reference(model, tokens, response_start):
    """Logits, per-token log-probs of tokens[1:], the loss and every gradient, in f32."""
    ids = torch.tensor([tokens])
    model.zero_grad()
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    # L = −mean of the response tokens' log-probs (what a policy-gradient step scales).
    loss = -lp[response_start - 1:].mean()
    loss.backward()
    grads = {f"grad.{n}": p.grad.float().contiguous() for n, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        grads.pop("grad.lm_head.weight", None)
    return logits.detach(), lp.detach(), loss.item(), grads


def to_v4_layout(path):
    """Rewrites a transformers 5 config.json in the layout transformers 4 wrote (and most hub
    checkpoints still have): top-level rope_theta / rope_scaling, torch_dtype."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = cfg.pop("dtype")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def build(name, tok, tokens, response_start, seed):
    d = os.path.join(OUT, name)
    arch = name.split("-")[0]
    cfg = CONFIGS[arch](len(tok))
    cfg.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"),
                        tok.convert_tokens_to_ids("<|endoftext|>")] if arch == "qwen2" \
        else tok.convert_tokens_to_ids("<|im_end|>")
    cfg.bos_token_id = None
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    randomise(model, seed)
    bf16 = name.endswith("-bf16")
    if bf16:
        model = model.to(torch.bfloat16)
    model.eval()
    shard = "20KB" if arch == "llama" else "100MB"
    model.save_pretrained(d, max_shard_size=shard)
    tok.save_pretrained(d)
    if arch == "llama":
        to_v4_layout(os.path.join(d, "config.json"))

    tensors = {}
    info = {"tokens": tokens, "response_start": response_start}
    if bf16:
        # The exact bf16 computation, then the same bf16-rounded weights computed in f32 (what
        # an f32 implementation must match tightly).
        _, lp16, loss16, _ = reference(model, tokens, response_start)
        tensors["logprobs_bf16"] = lp16
        info["loss_bf16"] = loss16
        model = model.float()
    logits, lp, loss, grads = reference(model, tokens, response_start)
    tensors.update({"logits": logits, "logprobs": lp, **grads})
    info["loss"] = loss
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, loss {loss:.6f}")


def check_export(export_dir, name):
    """Loads an exported directory in transformers; its log-probs must equal the reference."""
    with open(os.path.join(OUT, name, "reference.json")) as f:
        info = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="eager")
    model = model.float().eval()
    ids = torch.tensor([info["tokens"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    lp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    from safetensors.torch import load_file
    want = load_file(os.path.join(OUT, name, "reference.safetensors"))["logprobs"]
    err = (lp - want).abs().max().item()
    AutoTokenizer.from_pretrained(export_dir)
    print(f"{export_dir}: loads in transformers; max |Δ log-prob| against {name}: {err:.2e}")
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-export", nargs=2, metavar=("DIR", "NAME"))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    if args.check_export:
        err = check_export(*args.check_export)
        sys.exit(0 if err <= args.tolerance else 1)

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    tok_dir = os.path.join(OUT, "tokenizer")
    tok = build_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    texts = {t: tok(t, add_special_tokens=False)["input_ids"] for t in CORPUS}
    with open(os.path.join(tok_dir, "reference.json"), "w") as f:
        json.dump({"messages": MESSAGES, "chat": chat, "chat_ids": ids, "texts": texts,
                   "vocab": len(tok)}, f, indent=2, ensure_ascii=False)
    tokens = ids[:10] + tok("The answer is 42.", add_special_tokens=False)["input_ids"]
    response_start = 10
    for seed, name in enumerate(["llama", "qwen2", "qwen3", "qwen2-bf16"]):
        build(name, tok, tokens, response_start, seed)


if __name__ == "__main__":
    main()
