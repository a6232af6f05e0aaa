#!/usr/bin/env python3
"""The peer side of `rlrun bench`: the same workload in transformers / PyTorch, timed the same way.

Called by `rlrun bench <what>` in the same run (same machine, same torch threads); prints one JSON
line with the measured figures. Usage:
  peer.py forward  MODEL --batch B --seq T --iters N            prefill: forward with KV cache, last logits
  peer.py generate MODEL --prompts FILE --n N --max-new T        sampling at temperature 1, fixed length
  peer.py train    MODEL --batch B --seq T --iters N             forward+backward+AdamW step
"""
import argparse
import json
import os
import platform
import time

import torch


def load(model_dir, dtype, device):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return m


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what")
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--prompts")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=1e-6)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    out = {"peer": f"transformers (torch {torch.__version__})", "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine()}
    model = load(a.model, dtype, a.device)
    vocab = model.config.vocab_size
    if a.what == "forward":
        model.eval()
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=a.device)
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)  # warm-up
            sync(a.device)
            t = time.perf_counter()
            for _ in range(a.iters):
                model(ids, use_cache=True, logits_to_keep=1)
            sync(a.device)
            dt = (time.perf_counter() - t) / a.iters
        out.update(seconds=dt, tokens_per_s=a.batch * a.seq / dt)
    elif a.what == "generate":
        model.eval()
        prompts = json.load(open(a.prompts))["prompts"]
        t_max = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), t_max, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, t_max - len(p):] = torch.tensor(p)
            mask[i, t_max - len(p):] = 1
        ids, mask = ids.to(a.device), mask.to(a.device)
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=a.n,
                  max_new_tokens=a.max_new, min_new_tokens=a.max_new, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids[:1], attention_mask=mask[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
            sync(a.device)
            t = time.perf_counter()
            gen = model.generate(ids, attention_mask=mask, **kw)
            sync(a.device)
            dt = time.perf_counter() - t
        new = gen.shape[0] * (gen.shape[1] - t_max)
        out.update(seconds=dt, tokens=new, tokens_per_s=new / dt)
    elif a.what == "train":
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=a.device)

        def step():
            logits = model(ids).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            loss = -lp.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        sync(a.device)
        t = time.perf_counter()
        for _ in range(a.iters):
            step()
        sync(a.device)
        dt = (time.perf_counter() - t) / a.iters
        out.update(seconds=dt, tokens_per_s=a.batch * a.seq / dt)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
