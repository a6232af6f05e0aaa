//! Policy losses against the PyTorch reference (`scripts/loss_reference.py`, fixtures in
//! `.fixtures/losses`, made by `make fixtures`), and their invariance to micro-batching.
//!
//! Run: `cargo test -p rlrun-trainer --test loss_parity`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use rlrun_testkit::{max_abs_diff, read_safetensors};
use rlrun_trainer::loss::{
    merge_metrics, Aggregation, Correction, IsLevel, KlEstimator, KlLossConfig, LossConfig,
    LossInput, Metric, Normalizer, OffPolicyConfig, PolicyLossConfig,
};
use tch::{Kind, Tensor};

const LOSS_TOL: f64 = 1e-6;
const GRAD_TOL: f64 = 1e-5;
const METRIC_TOL: f64 = 1e-6;
/// 4 losses × 4 aggregations × (4 KL settings + 1 all-terms case) + 4 single-term cases.
const EXPECTED_CASES: usize = 4 * 4 * 5 + 4 + 4 * 2 * 2;

fn loss_fixtures() -> PathBuf {
    let dir = rlrun_testkit::fixtures().join("losses");
    assert!(
        dir.join("cases.json").exists(),
        "loss fixtures missing at {}: run `make fixtures` (or `.venv/bin/python scripts/loss_reference.py .fixtures/losses`)",
        dir.display()
    );
    dir
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn grad_or_zeros(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g
    } else {
        t.zeros_like()
    }
}

#[test]
fn losses_match_pytorch_reference() {
    let dir = loss_fixtures();
    let inputs = read_safetensors(&dir.join("inputs.safetensors"));
    let outputs = read_safetensors(&dir.join("outputs.safetensors"));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let norm: Normalizer = {
        let n = &index["normalizer"];
        Normalizer {
            tokens: n["tokens"].as_f64().unwrap(),
            sequences: n["sequences"].as_f64().unwrap(),
            max_response_len: n["max_response_len"].as_f64().unwrap(),
        }
    };
    let get = |name: &str| {
        inputs
            .get(name)
            .unwrap_or_else(|| panic!("`{name}` missing from inputs.safetensors"))
    };
    // The Rust normalizer from the mask agrees with the reference's.
    let from_mask = Normalizer::from_mask(get("mask"), norm.max_response_len).unwrap();
    assert_eq!(from_mask, norm);

    let cases = index["cases"].as_array().expect("cases");
    let mut combos = BTreeSet::new();
    let mut off_policy = BTreeSet::new();
    let mut checked = 0usize;
    let mut failures = Vec::new();
    let mut worst = [0.0f64; 3]; // loss, grads, metrics
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let cfg: PolicyLossConfig = serde_json::from_value(case["config"].clone())
            .unwrap_or_else(|e| panic!("{id}: config does not parse: {e}"));
        let uses = |k: &str| case["inputs"][k].as_bool().unwrap();
        let loss = cfg.build();
        assert_eq!(loss.name(), cfg.loss.name());

        let logprobs = leaf(get("logprobs"));
        let entropy = leaf(get("entropy"));
        let mut input = LossInput::new(
            &logprobs,
            get("old_logprobs"),
            get("advantages"),
            get("mask"),
            &norm,
        );
        if uses("ref") {
            input = input.with_ref(get("ref_logprobs"));
        }
        if uses("behavior") {
            input = input.with_behavior(get("behavior_logprobs"));
        }
        if uses("entropy") {
            input = input.with_entropy(&entropy);
        }
        let out = loss.compute(&input).unwrap_or_else(|e| panic!("{id}: {e}"));
        out.loss.backward();

        let want = |k: &str| &outputs[&format!("{id}.{k}")];
        let d_loss = max_abs_diff(&out.loss.reshape([1]), want("loss"));
        let d_glp = max_abs_diff(&grad_or_zeros(&logprobs), want("grad_logprobs"));
        let d_gent = max_abs_diff(&grad_or_zeros(&entropy), want("grad_entropy"));
        worst[0] = worst[0].max(d_loss);
        worst[1] = worst[1].max(d_glp).max(d_gent);
        if d_loss > LOSS_TOL {
            failures.push(format!("{id}: loss differs by {d_loss:e}"));
        }
        if d_glp > GRAD_TOL {
            failures.push(format!("{id}: grad logprobs differs by {d_glp:e}"));
        }
        if d_gent > GRAD_TOL {
            failures.push(format!("{id}: grad entropy differs by {d_gent:e}"));
        }

        let want_metrics = case["metrics"].as_object().unwrap();
        let got: BTreeMap<&str, &Metric> =
            out.metrics.iter().map(|(n, m)| (n.as_str(), m)).collect();
        let got_names: BTreeSet<&str> = got.keys().copied().collect();
        let want_names: BTreeSet<&str> = want_metrics.keys().map(String::as_str).collect();
        if got_names != want_names {
            failures.push(format!(
                "{id}: metric names {got_names:?} != reference {want_names:?}"
            ));
        }
        for (name, w) in want_metrics {
            let Some(m) = got.get(name.as_str()) else {
                continue;
            };
            let d = (m.value() - w["mean"].as_f64().unwrap()).abs();
            worst[2] = worst[2].max(d);
            if d > METRIC_TOL {
                failures.push(format!("{id}: metric {name} differs by {d:e}"));
            }
            match (m.max, w.get("max").and_then(|v| v.as_f64())) {
                (Some(a), Some(b)) if (a - b).abs() <= METRIC_TOL => {}
                (None, None) => {}
                (a, b) => failures.push(format!("{id}: metric {name} max {a:?} vs {b:?}")),
            }
        }

        if let Some(op) = cfg.off_policy {
            let loss_id = id.split('/').next().unwrap().to_owned();
            off_policy.insert((loss_id, op.correction.as_str(), op.level.as_str()));
        }
        let kl = cfg.kl.map(|k| k.estimator.as_str()).unwrap_or("none");
        let extras = (uses("behavior"), uses("entropy"));
        let loss_id = id.split('/').next().unwrap().to_owned();
        combos.insert((loss_id, cfg.aggregation.as_str(), kl, extras));
        checked += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{checked} reference cases; worst |diff|: loss {:e}, grads {:e}, metrics {:e}",
        worst[0], worst[1], worst[2]
    );
    assert_eq!(checked, EXPECTED_CASES, "number of reference cases checked");
    // Every loss × aggregation × KL combination is present (none can go missing silently).
    for loss in ["ppo", "ppo-dual", "gspo", "pg"] {
        for agg in Aggregation::ALL {
            for kl in ["none", "k1", "k2", "k3"] {
                assert!(
                    combos.contains(&(loss.to_owned(), agg.as_str(), kl, (false, false))),
                    "no reference case for {loss} / {} / {kl}",
                    agg.as_str()
                );
            }
            assert!(
                combos.contains(&(loss.to_owned(), agg.as_str(), "k2", (true, true))),
                "no all-terms case for {loss} / {}",
                agg.as_str()
            );
        }
        // The decoupled objective with each correction at each level.
        for correction in ["truncate", "mask"] {
            for level in ["token", "sequence"] {
                assert!(
                    off_policy.contains(&(loss.to_owned(), correction, level)),
                    "no off-policy case for {loss} / {correction} / {level}"
                );
            }
        }
    }
    assert!(off_policy.contains(&("ppo".to_owned(), "off", "token")));
}

/// Random (N, L) inputs with ragged masks (one 1-token sequence, one hole).
struct Batch {
    logprobs: Tensor,
    old: Tensor,
    adv: Tensor,
    mask: Tensor,
    reference: Tensor,
    behavior: Tensor,
    entropy: Tensor,
}

fn random_batch(n: i64, l: i64) -> Batch {
    tch::manual_seed(7);
    let opts = (Kind::Float, tch::Device::Cpu);
    let lengths: Vec<i64> = (0..n)
        .map(|i| [l, 1, l - 2, 3, l, 5, 2, l - 1][i as usize % 8])
        .collect();
    let pos = Tensor::arange(l, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
    let mask = pos
        .lt_tensor(&Tensor::from_slice(&lengths).unsqueeze(1))
        .to_kind(Kind::Float);
    let _ = mask.get(0).get(2).fill_(0.0); // a hole
    let old = -(Tensor::rand([n, l], opts) * 3.0 + 0.05);
    let logprobs = &old + Tensor::randn([n, l], opts) * 0.5;
    Batch {
        reference: &old + Tensor::randn([n, l], opts) * 0.2,
        behavior: &old + Tensor::randn([n, l], opts) * 0.6,
        adv: Tensor::randn([n, l], opts),
        entropy: Tensor::rand([n, l], opts) * 2.0,
        logprobs,
        old,
        mask,
    }
}

/// Loss, grads and merged metrics with the batch split into `parts` contiguous micro-batches.
fn split_run(
    cfg: &PolicyLossConfig,
    b: &Batch,
    norm: &Normalizer,
    parts: i64,
) -> (f64, Tensor, Tensor, HashMap<String, Metric>) {
    let loss = cfg.build();
    let lp = leaf(&b.logprobs);
    let ent = leaf(&b.entropy);
    let n = b.logprobs.size()[0];
    let per = (n + parts - 1) / parts;
    let mut total = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    let mut metrics = Vec::new();
    let mut start = 0;
    while start < n {
        let len = per.min(n - start);
        let rows = |t: &Tensor| t.narrow(0, start, len);
        let (lp_m, old_m, adv_m, mask_m) = (rows(&lp), rows(&b.old), rows(&b.adv), rows(&b.mask));
        let (ref_m, beh_m, ent_m) = (rows(&b.reference), rows(&b.behavior), rows(&ent));
        let input = LossInput::new(&lp_m, &old_m, &adv_m, &mask_m, norm)
            .with_ref(&ref_m)
            .with_behavior(&beh_m)
            .with_entropy(&ent_m);
        let out = loss.compute(&input).unwrap();
        total += out.loss;
        merge_metrics(&mut metrics, &out.metrics);
        start += len;
    }
    total.backward();
    (
        total.double_value(&[]),
        grad_or_zeros(&lp),
        grad_or_zeros(&ent),
        metrics.into_iter().collect(),
    )
}

#[test]
fn losses_are_invariant_to_micro_batching() {
    let b = random_batch(8, 7);
    let norm = Normalizer::from_mask(&b.mask, 10.0).unwrap();
    assert_eq!(norm.sequences, 8.0);
    let losses = [
        LossConfig::default(),
        LossConfig::Ppo {
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: Some(3.0),
        },
        LossConfig::Gspo {
            clip_low: 3e-4,
            clip_high: 4e-4,
        },
        LossConfig::Pg {},
    ];
    let kls = [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3];
    let mut checked = 0;
    for (li, loss) in losses.iter().enumerate() {
        for (ai, aggregation) in Aggregation::ALL.into_iter().enumerate() {
            let cfg = PolicyLossConfig {
                loss: loss.clone(),
                aggregation,
                kl: Some(KlLossConfig {
                    estimator: kls[(li + ai) % 3],
                    coef: 0.1,
                }),
                entropy_coef: 0.01,
                off_policy: Some(OffPolicyConfig {
                    correction: [Correction::Truncate, Correction::Mask][li % 2],
                    level: [IsLevel::Token, IsLevel::Sequence][ai % 2],
                    cap: 2.0,
                }),
            };
            let (l1, g1, e1, m1) = split_run(&cfg, &b, &norm, 1);
            assert!(m1["pg_loss"].count > 0.999 && m1["pg_loss"].count < 1.001);
            for parts in [2, 3, 4] {
                let (l, g, e, m) = split_run(&cfg, &b, &norm, parts);
                let what = format!(
                    "{} / {} / {parts} micro-batches",
                    loss.name(),
                    aggregation.as_str()
                );
                assert!((l - l1).abs() <= 1e-6, "{what}: loss {l} vs {l1}");
                assert!(max_abs_diff(&g, &g1) <= 1e-6, "{what}: grad logprobs");
                assert!(max_abs_diff(&e, &e1) <= 1e-6, "{what}: grad entropy");
                assert_eq!(m.len(), m1.len(), "{what}: metric names");
                for (name, a) in &m1 {
                    let b = &m[name];
                    assert!(
                        (a.value() - b.value()).abs() <= 1e-6,
                        "{what}: metric {name}"
                    );
                    assert_eq!(a.max, b.max, "{what}: metric {name} max");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 4 * 3);
}
