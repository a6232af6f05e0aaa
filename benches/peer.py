#!/usr/bin/env python3
"""The peer side of `rlrun bench`: the same workload in transformers / PyTorch, timed the same way.

Called by `rlrun bench <what>` in the same run (same machine, the same torch threads via --threads,
the same glibc allocator settings via the environment rlrun passes); prints one JSON line with the
measured figures and the settings used. Usage:
  peer.py forward  MODEL --batch B --seq T --iters N            prefill: forward with KV cache, last logits
  peer.py generate MODEL --prompts FILE --n N --max-new T [--eos] sampling at temperature 1; with --eos each
                                                                 sequence ends at the model's EOS (counted
                                                                 up to it), else every one runs T tokens
  peer.py train    MODEL --batch B --seq T --iters N --mode M   forward+backward+AdamW step; --mode verl:
                                                                 f32 weights and AdamW, torch.autocast to
                                                                 --dtype (what verl's FSDP workers do);
                                                                 --mode pure: weights and AdamW in --dtype
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
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--eos", action="store_true")
    ap.add_argument("--mode", choices=["verl", "pure"], default="verl")
    ap.add_argument("--entropy", action="store_true")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "PYTORCH_CUDA_ALLOC_CONF"}
    out = {"peer": f"transformers (torch {torch.__version__})", "threads": torch.get_num_threads(),
           "allocator": allocator, "machine": platform.processor() or platform.machine()}
    # verl keeps f32 weights and computes under autocast; "pure" holds the weights in --dtype.
    autocast = a.what == "train" and a.mode == "verl" and dtype != torch.float32
    model = load(a.model, torch.float32 if autocast else dtype, a.device)
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
        pad = model.generation_config.pad_token_id
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad if pad is not None else (eos[0] if eos else 0)
        ids = torch.full((len(prompts), t_max), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, t_max - len(p):] = torch.tensor(p)
            mask[i, t_max - len(p):] = 1
        ids, mask = ids.to(a.device), mask.to(a.device)
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=a.n,
                  max_new_tokens=a.max_new, pad_token_id=pad)
        if a.eos:
            kw["eos_token_id"] = eos
        else:
            kw.update(min_new_tokens=a.max_new, eos_token_id=None)
        with torch.no_grad():
            model.generate(ids[:1], attention_mask=mask[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
            sync(a.device)
            t = time.perf_counter()
            gen = model.generate(ids, attention_mask=mask, **kw)
            sync(a.device)
            dt = time.perf_counter() - t
        new = gen[:, t_max:]
        if a.eos and eos:
            # Tokens up to and including each sequence's first EOS (the rest is padding).
            hit = torch.zeros_like(new, dtype=torch.bool)
            for e in eos:
                hit |= new == e
            first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1], dtype=torch.int64))
            tokens = int(first.sum())
        else:
            tokens = new.numel()
        out.update(seconds=dt, tokens=tokens, tokens_per_s=tokens / dt, eos=a.eos,
                   mean_len=tokens / new.shape[0])
    elif a.what == "train":
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=a.device)
        device_type = "cuda" if a.device.startswith("cuda") else "cpu"

        def step():
            with torch.autocast(device_type, dtype=dtype, enabled=autocast):
                logits = model(ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1)
            lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            if a.entropy:
                with torch.no_grad():
                    (-(logp.exp() * logp).sum(-1)).mean()
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
        weights = next(model.parameters()).dtype
        out.update(seconds=dt, tokens_per_s=a.batch * a.seq / dt, mode=a.mode, entropy=a.entropy,
                   settings=f"weights {str(weights).replace('torch.', '')}, AdamW state {str(weights).replace('torch.', '')}, "
                            f"compute {'autocast ' if autocast else ''}{a.dtype}, "
                            f"AdamW kernel torch's default ({'foreach' if device_type == 'cuda' else 'for-loop'})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
