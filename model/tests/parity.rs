//! Logits parity with transformers for tiny random Llama-3 (llama3 rope scaling), Qwen2, Qwen3,
//! Gemma 3 (sliding-window layers), Qwen3-MoE, Qwen2-MoE (shared expert) and a sharded tied-embedding Llama (linear rope scaling): full forward with left and right padding,
//! and KV-cache prefill + incremental decode, each against transformers' full forward (f32, CPU).
//! References come from `scripts/hf_reference.py fixtures` (run by `make fixtures`).

use std::path::Path;

use rlrun_model::{build_model, CacheWrite, Device, Kind, KvCache, ModelFiles};
use rlrun_testkit::{fixtures, max_abs_diff, read_safetensors};
use tch::Tensor;

const TOL: f64 = 1e-4;

struct Case {
    model: rlrun_model::Model,
    ids: Tensor,
    mask: Tensor,
    pos: Tensor,
    logits: Tensor,
}

fn load(name: &str) -> Case {
    let dir = fixtures().join(name);
    let files = ModelFiles::open(&dir).unwrap();
    let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let model = build_model(files.config.clone(), &weights).unwrap();
    let r = read_safetensors(&dir.join("reference.safetensors"));
    Case {
        model,
        ids: r["input_ids"].shallow_clone(),
        mask: r["attention_mask"].shallow_clone(),
        pos: r["position_ids"].shallow_clone(),
        logits: r["logits"].shallow_clone(),
    }
}

/// max |ours - reference| over the valid positions.
fn valid_diff(ours: &Tensor, reference: &Tensor, mask: &Tensor) -> f64 {
    let valid = mask.to_kind(Kind::Bool).unsqueeze(-1);
    let d = (ours - reference)
        .abs()
        .masked_fill(&valid.logical_not(), 0.0);
    d.max().double_value(&[])
}

fn full_forward(name: &str) {
    let _guard = tch::no_grad_guard();
    let c = load(name);
    let hidden = c.model.forward(&c.ids, &c.pos, Some(&c.mask)).unwrap();
    let logits = c.model.logits(&hidden).unwrap();
    assert_eq!(logits.size(), c.logits.size());
    let d = valid_diff(&logits, &c.logits, &c.mask);
    eprintln!("{name}: full forward max |Δlogits| = {d:e}");
    assert!(d <= TOL, "{name}: max |Δlogits| = {d:e} > {TOL:e}");
    assert!(
        logits.isfinite().all().int64_value(&[]) == 1,
        "{name}: non-finite logits at padding"
    );
}

/// Prefill the first `prefill` valid tokens of every row (batched, right-padded, each row in its own
/// slot, rows mapped to slots in reverse to exercise the gather path), then decode the rest one
/// token per step for all rows at once (identity slots), comparing every logit with transformers.
fn cached_decode(name: &str, prefill: i64) {
    let _guard = tch::no_grad_guard();
    let c = load(name);
    let b = c.ids.size()[0];
    let mut rows: Vec<Vec<i64>> = Vec::new();
    let mut ref_rows: Vec<Tensor> = Vec::new();
    for r in 0..b {
        let m = c.mask.get(r).to_kind(Kind::Bool);
        rows.push(Vec::<i64>::try_from(c.ids.get(r).masked_select(&m)).unwrap());
        ref_rows.push(c.logits.get(r).index_select(0, &m.nonzero().squeeze_dim(1)));
    }
    let cfg = c.model.config().clone();
    let mut cache = KvCache::new(&cfg, 2 * b, 32, Kind::Float, Device::Cpu).unwrap();
    // Prefill: rows of different lengths, right-padded; row r goes to slot 2b - 1 - r.
    let lens: Vec<i64> = rows.iter().map(|r| prefill.min(r.len() as i64)).collect();
    let t = *lens.iter().max().unwrap();
    let mut ids = vec![0i64; (b * t) as usize];
    for (r, row) in rows.iter().enumerate() {
        for j in 0..lens[r] as usize {
            ids[r * t as usize + j] = row[j];
        }
    }
    let slots_host: Vec<i64> = (0..b).map(|r| 2 * b - 1 - r).collect();
    let slots = Tensor::from_slice(&slots_host);
    let start = vec![0i64; b as usize];
    let h = c
        .model
        .forward_cached(
            &Tensor::from_slice(&ids).view([b, t]),
            &mut cache,
            &CacheWrite {
                slots: &slots,
                slots_host: &slots_host,
                start: &start,
                lens: &lens,
            },
        )
        .unwrap();
    let logits = c.model.logits(&h).unwrap();
    for r in 0..b as usize {
        let got = logits.get(r as i64).narrow(0, 0, lens[r]);
        let want = ref_rows[r].narrow(0, 0, lens[r]);
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOL, "{name}: prefill row {r}: max |Δ| = {d:e}");
    }
    // Move each row's cache to slot r (identity layout) to decode all rows as one batch.
    for r in 0..b {
        cache
            .copy_prefix(2 * b - 1 - r, &[r], lens[r as usize])
            .unwrap();
    }
    let mut pos = lens.clone();
    let max_len = rows.iter().map(Vec::len).max().unwrap() as i64;
    let ident: Vec<i64> = (0..b).collect();
    let ident_t = Tensor::from_slice(&ident);
    let mut steps = 0;
    while pos.iter().zip(&rows).any(|(&p, r)| p < r.len() as i64) && steps < max_len {
        // Rows that are done feed a dummy token at their next position (ignored).
        let step_ids: Vec<i64> = pos
            .iter()
            .zip(&rows)
            .map(|(&p, r)| r.get(p as usize).copied().unwrap_or(0))
            .collect();
        let h = c
            .model
            .forward_cached(
                &Tensor::from_slice(&step_ids).view([b, 1]),
                &mut cache,
                &CacheWrite {
                    slots: &ident_t,
                    slots_host: &ident,
                    start: &pos,
                    lens: &vec![1; b as usize],
                },
            )
            .unwrap();
        let logits = c.model.logits(&h).unwrap();
        for r in 0..b as usize {
            if pos[r] < rows[r].len() as i64 {
                let d = max_abs_diff(&logits.get(r as i64).get(0), &ref_rows[r].get(pos[r]));
                assert!(
                    d <= TOL,
                    "{name}: decode row {r} position {}: max |Δ| = {d:e}",
                    pos[r]
                );
            }
        }
        for p in pos.iter_mut() {
            *p += 1;
        }
        steps += 1;
    }
    assert!(
        steps >= 4,
        "{name}: too few decode steps exercised ({steps})"
    );
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    full_forward("tiny-llama3");
    cached_decode("tiny-llama3", 5);
}

#[test]
fn qwen2_bias_tied_matches_transformers() {
    full_forward("tiny-qwen2");
    cached_decode("tiny-qwen2", 3);
}

#[test]
fn qwen3_qk_norm_head_dim_matches_transformers() {
    full_forward("tiny-qwen3");
    cached_decode("tiny-qwen3", 6);
}

/// Gemma 3: sliding-window layers (window 4 < the inputs) with their own RoPE base between global
/// layers with linear scaling, `(1 + w)` norms around attention and MLP, q/k norms, scaled
/// embeddings, GELU-tanh, `query_pre_attn_scalar` != head_dim. The decode runs past the window,
/// so the KV cache path applies it too.
#[test]
fn gemma3_sliding_window_matches_transformers() {
    let cfg = load("tiny-gemma3").model.config().clone();
    assert!(cfg.window() == Some(4) && cfg.is_sliding(0) && !cfg.is_sliding(2));
    full_forward("tiny-gemma3");
    cached_decode("tiny-gemma3", 2);
    cached_decode("tiny-gemma3", 7);
}

/// Qwen3-MoE: top-2 of 8 experts with renormalised weights on layers 0 and 2, a dense MLP on
/// layer 1 (`mlp_only_layers`).
#[test]
fn qwen3_moe_matches_transformers() {
    let cfg = load("tiny-qwen3moe").model.config().clone();
    assert_eq!(cfg.moe(), Some((8, 2, 32)));
    assert!(cfg.is_moe_layer(0) && !cfg.is_moe_layer(1) && cfg.is_moe_layer(2));
    full_forward("tiny-qwen3moe");
    cached_decode("tiny-qwen3moe", 4);
}

/// Qwen2-MoE: top-2 of 6 experts without renormalisation, plus the sigmoid-gated shared expert;
/// q/k/v bias.
#[test]
fn qwen2_moe_shared_expert_matches_transformers() {
    let cfg = load("tiny-qwen2moe").model.config().clone();
    assert_eq!(
        (cfg.moe(), cfg.shared_expert()),
        (Some((6, 2, 24)), Some(40))
    );
    assert!(cfg.qkv_bias());
    full_forward("tiny-qwen2moe");
    cached_decode("tiny-qwen2moe", 3);
}

#[test]
fn sharded_safetensors_linear_rope_matches_transformers() {
    assert!(fixtures()
        .join("tiny-llama-sharded/model.safetensors.index.json")
        .exists());
    full_forward("tiny-llama-sharded");
    cached_decode("tiny-llama-sharded", 1);
}

#[test]
fn bf16_and_f16_loading_convert_on_the_fly() {
    let dir = fixtures().join("tiny-qwen2");
    let files = ModelFiles::open(Path::new(&dir)).unwrap();
    let w32 = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    for kind in [Kind::BFloat16, Kind::Half] {
        let w = files.load_weights(kind, Device::Cpu).unwrap();
        assert_eq!(w.flat.kind(), kind);
        let d = max_abs_diff(&w.flat.to_kind(Kind::Float), &w32.flat);
        assert!(d < 0.02, "{kind:?}: {d}");
        assert!(d > 0.0, "{kind:?} should round");
    }
}

/// The shared-prompt forward used in training equals the full forward of each prompt +
/// continuation: prompts of different lengths, groups of different sizes, ragged continuations.
#[test]
fn grouped_forward_equals_full_forward() {
    let _guard = tch::no_grad_guard();
    for name in ["tiny-llama3", "tiny-qwen3", "tiny-gemma3", "tiny-qwen3moe"] {
        let c = load(name);
        let prompts: Vec<Vec<i64>> = vec![
            vec![5, 9, 33, 2, 17],
            vec![101, 4],
            vec![8, 7, 7, 15, 3, 12, 40],
        ];
        let conts: Vec<(usize, Vec<i64>)> = vec![
            (0, vec![11, 12, 13]),
            (0, vec![21]),
            (1, vec![31, 32, 33, 34]),
            (2, vec![41, 42]),
            (0, vec![51, 52, 53, 54]),
        ];
        let p = prompts.iter().map(Vec::len).max().unwrap();
        let r = conts.iter().map(|(_, c)| c.len()).max().unwrap();
        let mut pt = vec![0i64; prompts.len() * p];
        for (i, x) in prompts.iter().enumerate() {
            pt[i * p..i * p + x.len()].copy_from_slice(x);
        }
        let mut ct = vec![0i64; conts.len() * r];
        for (i, (_, x)) in conts.iter().enumerate() {
            ct[i * r..i * r + x.len()].copy_from_slice(x);
        }
        let lens: Vec<i64> = prompts.iter().map(|x| x.len() as i64).collect();
        let groups: Vec<i64> = conts.iter().map(|(g, _)| *g as i64).collect();
        let (hp, hc) = c
            .model
            .forward_grouped(
                &Tensor::from_slice(&pt).view([prompts.len() as i64, p as i64]),
                &lens,
                &Tensor::from_slice(&ct).view([conts.len() as i64, r as i64]),
                &groups,
            )
            .unwrap();
        for (i, (g, cont)) in conts.iter().enumerate() {
            let full: Vec<i64> = prompts[*g].iter().chain(cont).copied().collect();
            let t = full.len() as i64;
            let h = c
                .model
                .forward(
                    &Tensor::from_slice(&full).view([1, t]),
                    &Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]),
                    None,
                )
                .unwrap()
                .squeeze_dim(0);
            let plen = prompts[*g].len() as i64;
            let dp = max_abs_diff(&hp.get(*g as i64).narrow(0, 0, plen), &h.narrow(0, 0, plen));
            let dc = max_abs_diff(
                &hc.get(i as i64).narrow(0, 0, cont.len() as i64),
                &h.narrow(0, plen, cont.len() as i64),
            );
            assert!(
                dp <= 1e-5 && dc <= 1e-5,
                "{name} continuation {i}: prompt {dp:e}, continuation {dc:e}"
            );
        }
    }
}
