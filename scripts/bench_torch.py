#!/usr/bin/env python3
"""PyTorch eager reference for `flywheel bench trainer`: the same model (a config.json written
by the bench), the same batch shape and thread count, on the CPU or a GPU: f32 (on the GPU TF32
is off, as in Flywheel's f32 path), or with `--products bf16` the forward and backward under
bf16 autocast (bf16 products, f32 weights), as Flywheel's bf16 products. Prints one JSON line:
{"train_tokens_per_s": …, "sample_tokens_per_s": …}.

    .venv-torch/bin/python scripts/bench_torch.py --config DIR --batch 4 --seq-len 128 \
        --iters 3 --sample-tokens 64 --threads 2 [--device cuda] [--products bf16]
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="directory holding config.json")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--sample-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--products", default="f32", choices=["f32", "bf16"])
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.config)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).float().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len)).to(device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    autocast = torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.products == "bf16")

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        lp = logp.gather(2, ids[:, 1:, None])[..., 0]
        (-lp.sum() / lp.numel()).backward()
        opt.step()

    train_step()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(a.iters):
        train_step()
    sync()
    train_s = (time.perf_counter() - start) / a.iters
    tokens = a.batch * (a.seq_len - 1)

    model.eval()
    prompt = ids[:1, :8]
    with torch.no_grad(), autocast:
        model.generate(prompt, max_new_tokens=4, do_sample=True, min_new_tokens=4)  # warm-up
        sync()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=a.sample_tokens, min_new_tokens=a.sample_tokens,
                       do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        sync()
        sample_s = time.perf_counter() - start
    print(json.dumps({"train_tokens_per_s": tokens / train_s,
                      "sample_tokens_per_s": a.sample_tokens / sample_s}))


if __name__ == "__main__":
    main()
