//! `[algorithm.loss]` parsing, validation, and the loss's input checks.
//!
//! Run: `cargo test -p rlrun-trainer --test loss_config`.

use rlrun_trainer::loss::{
    aggregate, kl_penalty, Aggregation, Correction, IsLevel, KlEstimator, KlLossConfig, LossConfig,
    LossInput, Normalizer, OffPolicyConfig, PolicyLossConfig,
};
use serde::Deserialize;
use tch::{Kind, Tensor};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipe {
    algorithm: Algorithm,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Algorithm {
    loss: PolicyLossConfig,
}

fn parse(toml_text: &str) -> Result<PolicyLossConfig, String> {
    toml::from_str::<Recipe>(toml_text)
        .map(|r| r.algorithm.loss)
        .map_err(|e| e.to_string())
}

const EXAMPLE: &str = r#"
[algorithm.loss]
name = "ppo"
clip_low = 0.2
clip_high = 0.28
dual_clip = 3.0
aggregation = "token-mean"
entropy_coef = 0.0
kl = { estimator = "k3", coef = 0.001 }
off_policy = { correction = "mask", level = "sequence", cap = 3.0 }
"#;

#[test]
fn example_recipe_parses() {
    let cfg = parse(EXAMPLE).unwrap();
    assert_eq!(
        cfg,
        PolicyLossConfig {
            loss: LossConfig::Ppo {
                clip_low: 0.2,
                clip_high: 0.28,
                dual_clip: Some(3.0),
            },
            aggregation: Aggregation::TokenMean,
            kl: Some(KlLossConfig {
                estimator: KlEstimator::K3,
                coef: 0.001,
            }),
            entropy_coef: 0.0,
            off_policy: Some(OffPolicyConfig {
                correction: Correction::Mask,
                level: IsLevel::Sequence,
                cap: 3.0,
            }),
        }
    );
    cfg.validate().unwrap();
    assert_eq!(cfg.build().name(), "ppo");
}

#[test]
fn defaults_and_every_name_builds() {
    let cases = [
        (
            "name = \"ppo\"",
            LossConfig::Ppo {
                clip_low: 0.2,
                clip_high: 0.2,
                dual_clip: None,
            },
        ),
        (
            "name = \"gspo\"\naggregation = \"seq-mean-token-mean\"",
            LossConfig::Gspo {
                clip_low: 3e-4,
                clip_high: 4e-4,
            },
        ),
        ("name = \"pg\"", LossConfig::Pg {}),
    ];
    for (body, want) in cases {
        let cfg = parse(&format!("[algorithm.loss]\n{body}\n")).unwrap();
        assert_eq!(cfg.loss, want);
        assert_eq!(cfg.kl, None);
        assert_eq!(cfg.entropy_coef, 0.0);
        assert_eq!(cfg.off_policy, None);
        cfg.validate().unwrap();
        assert_eq!(cfg.build().name(), want.name());
    }
    for agg in Aggregation::ALL {
        let cfg = parse(&format!(
            "[algorithm.loss]\nname = \"pg\"\naggregation = \"{}\"\nkl = {{ coef = 0.1 }}\n",
            agg.as_str()
        ))
        .unwrap();
        assert_eq!(cfg.aggregation, agg);
        assert_eq!(
            cfg.kl.unwrap().estimator,
            KlEstimator::K3,
            "default estimator"
        );
    }
    // Round trip through serde (the recipe is echoed into run directories).
    let cfg = parse(EXAMPLE).unwrap();
    let back: PolicyLossConfig =
        serde_json::from_value(serde_json::to_value(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    for (body, key) in [
        ("name = \"ppo\"\nclip_ratio = 0.2", "clip_ratio"),
        ("name = \"gspo\"\ndual_clip = 3.0", "dual_clip"),
        ("name = \"pg\"\nclip_low = 0.2", "clip_low"),
        ("name = \"ppo\"\naggregaton = \"token-mean\"", "aggregaton"),
        (
            "name = \"ppo\"\nkl = { estimator = \"k3\", coef = 0.1, target = 1 }",
            "target",
        ),
    ] {
        let err = parse(&format!("[algorithm.loss]\n{body}\n")).unwrap_err();
        assert!(
            err.contains(key),
            "error for `{key}` does not name it: {err}"
        );
    }
    let err = parse("[algorithm.loss]\nname = \"grpo\"\n").unwrap_err();
    assert!(err.contains("grpo"), "{err}");
    let err = parse("[algorithm.loss]\nname = \"pg\"\naggregation = \"mean\"\n").unwrap_err();
    assert!(err.contains("mean"), "{err}");
    let err = parse("[algorithm.loss]\nname = \"pg\"\nkl = { estimator = \"k4\", coef = 0.1 }\n")
        .unwrap_err();
    assert!(err.contains("k4"), "{err}");
}

#[test]
fn out_of_range_values_are_rejected() {
    let ones = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
    let norm = Normalizer {
        tokens: 6.0,
        sequences: 2.0,
        max_response_len: 3.0,
    };
    for (body, what) in [
        ("name = \"ppo\"\ndual_clip = 0.5", "dual_clip"),
        ("name = \"ppo\"\nclip_low = 1.5", "clip_low"),
        ("name = \"gspo\"\nclip_high = -0.1", "clip_high"),
        (
            "name = \"pg\"\noff_policy = { cap = 0.5 }",
            "off_policy.cap",
        ),
        ("name = \"pg\"\nkl = { coef = -1.0 }", "kl.coef"),
    ] {
        let cfg = parse(&format!("[algorithm.loss]\n{body}\n")).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
        // A built invalid config refuses to compute.
        let input = LossInput::new(&ones, &ones, &ones, &ones, &norm);
        let err = cfg.build().compute(&input).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
}

#[test]
fn inconsistent_inputs_are_errors() {
    let opts = (Kind::Float, tch::Device::Cpu);
    let t = Tensor::zeros([2, 3], opts);
    let short = Tensor::zeros([2, 2], opts);
    let mask = Tensor::ones([2, 3], opts);
    let norm = Normalizer::from_mask(&mask, 3.0).unwrap();
    assert_eq!(
        norm,
        Normalizer {
            tokens: 6.0,
            sequences: 2.0,
            max_response_len: 3.0
        }
    );
    let plain = PolicyLossConfig::default().build();
    assert!(plain
        .compute(&LossInput::new(&t, &t, &short, &mask, &norm))
        .is_err());
    assert!(plain
        .compute(&LossInput::new(&t, &t, &t, &mask, &norm).with_ref(&short))
        .is_err());
    assert!(plain
        .compute(&LossInput::new(&t, &t, &t, &mask, &norm))
        .is_ok());

    let with_kl = PolicyLossConfig {
        kl: Some(KlLossConfig {
            estimator: KlEstimator::K1,
            coef: 0.1,
        }),
        ..Default::default()
    };
    let err = with_kl
        .build()
        .compute(&LossInput::new(&t, &t, &t, &mask, &norm))
        .unwrap_err();
    assert!(err.to_string().contains("ref_logprobs"), "{err}");

    let with_entropy = PolicyLossConfig {
        entropy_coef: 0.01,
        ..Default::default()
    };
    let err = with_entropy
        .build()
        .compute(&LossInput::new(&t, &t, &t, &mask, &norm))
        .unwrap_err();
    assert!(err.to_string().contains("entropy"), "{err}");

    let zero = Normalizer {
        tokens: 0.0,
        ..norm
    };
    assert!(aggregate(&t, &mask, Aggregation::TokenMean, &zero).is_err());
    assert!(kl_penalty(&t, &short, KlEstimator::K3).is_err());
}

#[test]
fn kl_estimators_on_known_values() {
    let lp = Tensor::from_slice(&[-1.0f32, -2.0]).reshape([1, 2]);
    let rf = Tensor::from_slice(&[-1.5f32, -1.0]).reshape([1, 2]);
    // log r = ref − lp = [−0.5, 1.0]
    let expect = |est, want: [f64; 2]| {
        let got = Vec::<f64>::try_from(kl_penalty(&lp, &rf, est).unwrap().reshape([2])).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{est:?}: {got:?} vs {want:?}");
        }
    };
    expect(KlEstimator::K1, [0.5, -1.0]);
    expect(KlEstimator::K2, [0.125, 0.5]);
    expect(
        KlEstimator::K3,
        [(-0.5f64).exp() - 1.0 + 0.5, 1f64.exp() - 1.0 - 1.0],
    );
}
