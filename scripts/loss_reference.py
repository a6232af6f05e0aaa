#!/usr/bin/env python3
"""PyTorch reference for rlrun's policy losses (trainer/src/loss.rs), written independently.

Run:  .venv/bin/python scripts/loss_reference.py .fixtures/losses

Writes, into the given directory, seeded random inputs (N=6 sequences, L=9 response tokens,
ragged masks with a 1-token sequence and a hole) and, for every loss (ppo, ppo with clip-higher
0.2/0.28 and dual clip 3.0, gspo, pg) x aggregation (4 modes) x KL (none, k1, k2, k3 with
coef 0.1), plus cases with the entropy bonus, the off-policy correction (every loss x
{truncate, mask} x {token, sequence}) and all terms together, the loss value, its
gradients w.r.t. `logprobs` and `entropy`, and the metrics:

    inputs.safetensors   logprobs, old_logprobs, advantages, mask, ref_logprobs,
                         behavior_logprobs, entropy          (all f32, (N, L))
    outputs.safetensors  {case}.loss (1,), {case}.grad_logprobs (N, L), {case}.grad_entropy (N, L)
    cases.json           {"normalizer": {...}, "cases": [{"id", "config", "inputs", "metrics"}]}

`config` is the `[algorithm.loss]` table as JSON; `inputs` says which optional tensors are passed;
`metrics` maps a name to {"mean": float, "max": float (only for `ratio` and `is_ratio`)}.

Definitions (rlrun's, from the papers; where verl's core_algos differs, e.g. its always-on dual
clip, its k3 value clamped to [-10, 10] and its seq-mean-token-sum-norm constant, see docs/verl.md):
  ratio r = exp(clamp(lp - old, -20, 20))
  ppo:  max(-A r, -A clip(r, 1-cl, 1+ch)); with dual clip c, for A < 0: min(that, -A c)
  gspo: s_i = exp(sum_t m (lp - old) / max(1, sum_t m)); s_it = exp(min(lp - sg(lp) + sg(log s_i), 10))
        max(-A s_it, -A clip(s_it, 1-cl, 1+ch))
  pg:   -A lp
  off-policy (decoupled PPO): rho = exp(clamp(old - behavior, +-20)) per token, or per sequence
        exp(clamp(sum_t m (old - behavior), +-20)) on each of its tokens;
        per-token loss *= min(rho, cap) (truncate) or rho [rho <= cap] (mask)   (detached)
  KL (log r = ref - lp): k1 = -log r, k2 = (log r)^2 / 2, k3 = exp(clamp(log r, +-20)) - 1 - log r
  total = agg(pg) + kl_coef agg(kl) - entropy_coef agg(entropy)
  agg: token-mean Σ lm / T; seq-mean-token-sum Σ lm / S;
       seq-mean-token-mean Σ_i (Σ_t lm / max(1, Σ_t m)) / S; seq-mean-token-sum-norm Σ lm / (S Lmax)
Metrics are means over masked tokens, in f64: pg_clipfrac_low (A<0 and r<1-cl),
pg_clipfrac_high (A>0 and r>1+ch), pg_clipfrac_dual (A<0 and r>c), ppo_kl (old - lp), ratio
(mean and max), entropy, kl (configured estimator, k3 if none), behavior_kl (k3 of KL(mu || pi_old)),
is_ratio (mean and max), is_weight_mean, is_capped_frac; pg_loss is the
aggregated policy-gradient term.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

N, L = 6, 9
LENGTHS = [9, 1, 6, 4, 9, 7]
HOLE = (4, 3)  # a masked-out token inside sequence 4 (e.g. tool output)
MAX_RESPONSE_LEN = 12.0  # Dr.GRPO's constant (generation budget), deliberately != L
KL_COEF = 0.1
ENTROPY_COEF = 0.01
IS_CAP = 2.0
TIS = {"correction": "truncate", "level": "token", "cap": IS_CAP}

LOSSES = {
    "ppo": {"name": "ppo", "clip_low": 0.2, "clip_high": 0.2},
    "ppo-dual": {"name": "ppo", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0},
    "gspo": {"name": "gspo", "clip_low": 3e-4, "clip_high": 4e-4},
    "pg": {"name": "pg"},
}
AGGREGATIONS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLS = [None, "k1", "k2", "k3"]


def make_inputs():
    g = torch.Generator().manual_seed(20250117)
    mask = torch.zeros(N, L)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1.0
    mask[HOLE] = 0.0
    old = -(torch.rand(N, L, generator=g) * 3.0 + 0.05)
    log_ratio = torch.randn(N, L, generator=g) * 0.3
    adv = torch.randn(N, L, generator=g)
    # Make every clipping branch fire: (row, col, log ratio, advantage).
    for i, t, lr, a in [
        (0, 1, 1.5, -1.0),  # r = 4.5 > c = 3, A < 0: dual clip
        (5, 2, 1.6, -0.4),  # dual clip
        (0, 2, -1.5, -0.8),  # r < 1 - cl, A < 0: lower clip
        (3, 1, -1.2, -0.7),  # lower clip
        (2, 0, 1.4, 0.8),  # r > 1 + ch, A > 0: upper clip
        (4, 5, 0.9, 1.1),  # upper clip
        (2, 3, -0.9, 0.6),  # r small, A > 0: unclipped
        (1, 0, 0.25, 0.9),  # the 1-token sequence, upper clip
    ]:
        log_ratio[i, t] = lr
        adv[i, t] = a
    logprobs = old + log_ratio
    ref = old + torch.randn(N, L, generator=g) * 0.2
    behavior = old + torch.randn(N, L, generator=g) * 0.6
    entropy = torch.rand(N, L, generator=g) * 2.0
    return {
        "logprobs": logprobs,
        "old_logprobs": old,
        "advantages": adv,
        "mask": mask,
        "ref_logprobs": ref,
        "behavior_logprobs": behavior,
        "entropy": entropy,
    }


def normalizer(mask):
    return {
        "tokens": float(mask.double().sum()),
        "sequences": float((mask.sum(-1) > 0).double().sum()),
        "max_response_len": MAX_RESPONSE_LEN,
    }


def agg_loss(loss_mat, mask, mode, norm):
    """rlrun's aggregation: the mini-batch's global counts; seq-mean-token-sum-norm divides by
    S * Lmax (Dr. GRPO), unlike verl's agg_loss (docs/verl.md)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / norm["tokens"]
    if mode == "seq-mean-token-sum":
        return (loss_mat * mask).sum(dim=-1).sum() / norm["sequences"]
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        return per_seq.sum() / norm["sequences"]
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * mask).sum() / (norm["sequences"] * norm["max_response_len"])
    raise ValueError(mode)


def kl_estimate(lp, ref, estimator):
    log_r = ref.detach() - lp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = torch.clamp(log_r, min=-20.0, max=20.0)
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(estimator)


class Metrics:
    def __init__(self, mask):
        self.mask = mask.double()
        self.out = {}

    def mean(self, name, x):
        x = x.detach().double()
        self.out[name] = {"mean": float((x * self.mask).sum() / self.mask.sum())}

    def mean_max(self, name, x):
        self.mean(name, x)
        x = x.detach().double()
        self.out[name]["max"] = float(x[self.mask > 0].max())


def ppo_tokens(lp, old, adv, cfg, metrics):
    ratio = torch.exp(torch.clamp(lp - old, min=-20.0, max=20.0))
    cl, ch = cfg["clip_low"], cfg["clip_high"]
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - cl, 1.0 + ch)
    loss = torch.maximum(l1, l2)
    r = ratio.detach()
    metrics.mean("ppo_kl", old - lp.detach())
    metrics.mean_max("ratio", r)
    metrics.mean("pg_clipfrac_low", ((adv < 0) & (r < 1.0 - cl)).float())
    metrics.mean("pg_clipfrac_high", ((adv > 0) & (r > 1.0 + ch)).float())
    c = cfg.get("dual_clip")
    if c is not None:
        l3 = -adv * c
        loss = torch.where(adv < 0, torch.minimum(loss, l3), loss)
        metrics.mean("pg_clipfrac_dual", ((adv < 0) & (r > c)).float())
    return loss


def gspo_tokens(lp, old, adv, mask, cfg, metrics):
    neg_kl = lp - old
    seq_len = mask.sum(dim=-1).clamp(min=1.0)
    log_seq_ratio = (neg_kl * mask).sum(dim=-1) / seq_len  # (N,)
    log_s = lp - lp.detach() + log_seq_ratio.detach().unsqueeze(-1)
    s = torch.exp(torch.clamp(log_s, max=10.0))
    cl, ch = cfg["clip_low"], cfg["clip_high"]
    loss = torch.maximum(-adv * s, -adv * torch.clamp(s, 1.0 - cl, 1.0 + ch))
    sd = s.detach()
    metrics.mean("ppo_kl", old - lp.detach())
    metrics.mean_max("ratio", sd)
    metrics.mean("pg_clipfrac_low", ((adv < 0) & (sd < 1.0 - cl)).float())
    metrics.mean("pg_clipfrac_high", ((adv > 0) & (sd > 1.0 + ch)).float())
    return loss


def pg_tokens(lp, old, adv, metrics):
    with torch.no_grad():
        ratio = torch.exp(torch.clamp(lp - old, min=-20.0, max=20.0))
    metrics.mean("ppo_kl", old - lp.detach())
    metrics.mean_max("ratio", ratio)
    return -adv * lp


def run_case(inputs, norm, cfg, use):
    lp = inputs["logprobs"].clone().requires_grad_(True)
    ent = inputs["entropy"].clone().requires_grad_(True)
    old, adv, mask = inputs["old_logprobs"], inputs["advantages"], inputs["mask"]
    mode = cfg.get("aggregation", "token-mean")
    metrics = Metrics(mask)

    name = cfg["name"]
    if name == "ppo":
        tokens = ppo_tokens(lp, old, adv, cfg, metrics)
    elif name == "gspo":
        tokens = gspo_tokens(lp, old, adv, mask, cfg, metrics)
    else:
        tokens = pg_tokens(lp, old, adv, metrics)

    if use["behavior"]:
        behavior = inputs["behavior_logprobs"]
        log_rho = old - behavior  # log(pi_old / mu): proximal over behaviour policy
        metrics.mean("behavior_kl", torch.exp(log_rho) - 1.0 - log_rho)  # k3 of KL(mu || pi_old)
        op = cfg.get("off_policy")
        if op is not None and op["correction"] != "off":
            if op["level"] == "sequence":
                log_rho = (log_rho * mask).sum(dim=-1, keepdim=True).expand_as(log_rho)
            rho = torch.exp(torch.clamp(log_rho, min=-20.0, max=20.0)).detach()
            cap = op["cap"]
            if op["correction"] == "truncate":
                w = torch.clamp(rho, max=cap)
            else:  # mask: drop tokens (sequences) whose ratio exceeds the cap
                w = torch.where(rho <= cap, rho, torch.zeros_like(rho))
            metrics.mean_max("is_ratio", rho)
            metrics.mean("is_weight_mean", w)
            metrics.mean("is_capped_frac", (rho > cap).float())
            tokens = tokens * w
    pg = agg_loss(tokens, mask, mode, norm)
    metrics.out["pg_loss"] = {"mean": float(pg.detach().double())}
    loss = pg

    kl = cfg.get("kl")
    if use["ref"]:
        estimator = kl["estimator"] if kl else "k3"
        kl_tok = kl_estimate(lp, inputs["ref_logprobs"], estimator)
        metrics.mean("kl", kl_tok)
        if kl:
            loss = loss + kl["coef"] * agg_loss(kl_tok, mask, mode, norm)
    coef = cfg.get("entropy_coef", 0.0)
    if use["entropy"]:
        metrics.mean("entropy", ent)
        if coef != 0.0:
            loss = loss - coef * agg_loss(ent, mask, mode, norm)

    loss.backward()
    grad_lp = lp.grad if lp.grad is not None else torch.zeros_like(lp)
    grad_ent = ent.grad if ent.grad is not None else torch.zeros_like(ent)
    return loss.detach().reshape(1), grad_lp, grad_ent, metrics.out


def cases():
    out = []
    for loss_id, loss_cfg in LOSSES.items():
        for mode in AGGREGATIONS:
            for kl in KLS:
                cfg = dict(loss_cfg, aggregation=mode)
                if kl:
                    cfg["kl"] = {"estimator": kl, "coef": KL_COEF}
                use = {"ref": kl is not None, "behavior": False, "entropy": False}
                out.append((f"{loss_id}/{mode}/{kl or 'nokl'}", cfg, use))
            # Every term at once: KL (k2), entropy bonus and TIS.
            cfg = dict(
                loss_cfg,
                aggregation=mode,
                kl={"estimator": "k2", "coef": KL_COEF},
                entropy_coef=ENTROPY_COEF,
                off_policy=dict(TIS),
            )
            out.append((f"{loss_id}/{mode}/all-terms", cfg, {"ref": True, "behavior": True, "entropy": True}))
    every = {"ref": False, "behavior": False, "entropy": False}
    out += [
        ("ppo/token-mean/entropy-bonus", dict(LOSSES["ppo"], entropy_coef=0.05), dict(every, entropy=True)),
        ("ppo/token-mean/off-policy-off",
         dict(LOSSES["ppo"], off_policy={"correction": "off", "level": "token", "cap": IS_CAP}),
         dict(every, behavior=True)),
        ("ppo/token-mean/kl-metric-only", dict(LOSSES["ppo"]), dict(every, ref=True)),
        ("gspo/seq-mean-token-mean/entropy-metric-only",
         dict(LOSSES["gspo"], aggregation="seq-mean-token-mean"), dict(every, entropy=True)),
    ]
    # The decoupled objective: every loss x {truncate, mask} x {token, sequence}.
    for i, (loss_id, loss_cfg) in enumerate(LOSSES.items()):
        for j, correction in enumerate(["truncate", "mask"]):
            for k, level in enumerate(["token", "sequence"]):
                mode = AGGREGATIONS[(i + j + k) % len(AGGREGATIONS)]
                op = {"correction": correction, "level": level, "cap": IS_CAP}
                cfg = dict(loss_cfg, aggregation=mode, off_policy=op)
                out.append((f"{loss_id}/{mode}/{correction}-{level}", cfg, dict(every, behavior=True)))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    inputs = make_inputs()
    norm = normalizer(inputs["mask"])
    tensors, index = {}, []
    for case_id, cfg, use in cases():
        loss, g_lp, g_ent, metrics = run_case(inputs, norm, cfg, use)
        tensors[f"{case_id}.loss"] = loss
        tensors[f"{case_id}.grad_logprobs"] = g_lp
        tensors[f"{case_id}.grad_entropy"] = g_ent
        index.append({"id": case_id, "config": cfg, "inputs": use, "metrics": metrics})
    save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(out_dir, "inputs.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "outputs.safetensors"))
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump({"normalizer": norm, "cases": index}, f, indent=1)
    print(f"wrote {len(index)} loss cases to {out_dir}")


if __name__ == "__main__":
    main()
