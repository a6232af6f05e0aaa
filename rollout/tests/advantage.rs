//! Advantage estimators: golden values computed by hand, and properties on random batches.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlrun_rollout::advantage::filter::{filter_zero_variance_groups, DynamicSampler};
use rlrun_rollout::*;

const TOL: f32 = 1e-5;

fn assert_close(actual: &[Vec<f32>], expected: &[Vec<f32>]) {
    assert_eq!(actual.len(), expected.len(), "number of sequences");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.len(), e.len(), "length of sequence {i}");
        for (t, (x, y)) in a.iter().zip(e).enumerate() {
            assert!(
                (x - y).abs() < TOL,
                "seq {i} token {t}: got {x}, expected {y}\nall: {actual:?}"
            );
        }
    }
}

/// Group 1: [1, 0, 0, 1]; group 2: [2, 2] (zero variance); group 3: [3] (singleton).
const REWARDS: [f32; 7] = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0];
const GROUPS: [u64; 7] = [1, 1, 1, 1, 2, 2, 3];
const LENGTHS: [usize; 7] = [2, 1, 3, 1, 2, 2, 1];

fn expand(per_seq: [f32; 7]) -> Vec<Vec<f32>> {
    per_seq
        .iter()
        .zip(LENGTHS)
        .map(|(&a, l)| vec![a; l])
        .collect()
}

#[test]
fn grpo_golden() {
    // mean 0.5, unbiased std sqrt(1/3) = 0.577350; 0.5 / 0.577350 = 0.866025
    let a = 0.866_025_4;
    let out = Grpo::default()
        .compute(&AdvantageInput::new(&REWARDS, &GROUPS, &LENGTHS))
        .unwrap();
    assert_close(&out.advantages, &expand([a, -a, -a, a, 0.0, 0.0, 0.0]));
    assert_close(&out.returns, &expand(REWARDS));
    assert_eq!(out.metrics["groups"], 3.0);
    assert_eq!(out.metrics["zero_variance_groups"], 2.0);
}

#[test]
fn dr_grpo_golden() {
    let out = DrGrpo::default()
        .compute(&AdvantageInput::new(&REWARDS, &GROUPS, &LENGTHS))
        .unwrap();
    assert_close(
        &out.advantages,
        &expand([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0]),
    );
}

#[test]
fn rloo_golden() {
    // 1 - (0+0+1)/3 = 2/3; 0 - (1+0+1)/3 = -2/3
    let t = 2.0 / 3.0;
    let out = Rloo::default()
        .compute(&AdvantageInput::new(&REWARDS, &GROUPS, &LENGTHS))
        .unwrap();
    assert_close(&out.advantages, &expand([t, -t, -t, t, 0.0, 0.0, 0.0]));
    // Unequal values: [1, 2, 6] → 1-4, 2-3.5, 6-1.5
    let out = Rloo::default()
        .compute(&AdvantageInput::new(
            &[1.0, 2.0, 6.0],
            &[0, 0, 0],
            &[1, 1, 1],
        ))
        .unwrap();
    assert_close(&out.advantages, &[vec![-3.0], vec![-1.5], vec![4.5]]);
}

#[test]
fn reinforce_pp_golden() {
    // Token returns [1, 1] and [0]: mean 2/3, unbiased var 1/3, std 0.577350.
    let out = ReinforcePp::default()
        .compute(&AdvantageInput::new(&[1.0, 0.0], &[0, 1], &[2, 1]))
        .unwrap();
    assert_close(
        &out.advantages,
        &[vec![0.577_350_3, 0.577_350_3], vec![-1.154_700_5]],
    );
    assert_close(&out.returns, &[vec![1.0, 1.0], vec![0.0]]);

    // Discounted returns with per-token rewards (γ = 0.5):
    // r = [0.1, -0.2, 0 + 1]; G2 = 1, G1 = -0.2 + 0.5 = 0.3, G0 = 0.1 + 0.15 = 0.25.
    let token_rewards = vec![vec![0.1, -0.2, 0.0]];
    let out = ReinforcePp { gamma: 0.5 }
        .compute(&AdvantageInput::new(&[1.0], &[0], &[3]).with_token_rewards(&token_rewards))
        .unwrap();
    assert_close(&out.returns, &[vec![0.25, 0.3, 1.0]]);
    // Whitened: mean 0.516667, unbiased std sqrt(0.351667 / 2) = 0.419325
    let (m, s) = (0.516_666_7f32, 0.419_324_9f32);
    assert_close(
        &out.advantages,
        &[vec![(0.25 - m) / s, (0.3 - m) / s, (1.0 - m) / s]],
    );
}

#[test]
fn reinforce_pp_baseline_golden() {
    // Scores minus group mean: [0.5], [-0.5], [0, 0]; over 4 tokens mean 0, unbiased var 1/6.
    let k = 0.5 / (1.0f32 / 6.0).sqrt();
    let out = ReinforcePpBaseline::default()
        .compute(&AdvantageInput::new(
            &[1.0, 0.0, 1.0],
            &[1, 1, 2],
            &[1, 1, 2],
        ))
        .unwrap();
    assert_close(&out.advantages, &[vec![k], vec![-k], vec![0.0, 0.0]]);
}

#[test]
fn gae_golden() {
    // γ = 0.9, λ = 0.8, r = [0, 0, 1], V = [0.5, 0.6, 0.7]
    // δ2 = 0.3, A2 = 0.3; δ1 = 0.63 - 0.6 = 0.03, A1 = 0.03 + 0.72·0.3 = 0.246;
    // δ0 = 0.54 - 0.5 = 0.04, A0 = 0.04 + 0.72·0.246 = 0.21712.
    let values = vec![vec![0.5, 0.6, 0.7]];
    let gae = Gae {
        gamma: 0.9,
        lambda: 0.8,
        whiten: false,
    };
    let out = gae
        .compute(&AdvantageInput::new(&[1.0], &[0], &[3]).with_values(&values))
        .unwrap();
    assert_close(&out.advantages, &[vec![0.21712, 0.246, 0.3]]);
    assert_close(&out.returns, &[vec![0.71712, 0.846, 1.0]]);

    // Whitened (default): zero mean, unit unbiased std over the batch's tokens.
    let out = Gae {
        gamma: 0.9,
        lambda: 0.8,
        whiten: true,
    }
    .compute(&AdvantageInput::new(&[1.0], &[0], &[3]).with_values(&values))
    .unwrap();
    let a = &out.advantages[0];
    let mean: f32 = a.iter().sum::<f32>() / 3.0;
    let var: f32 = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 2.0;
    assert!(mean.abs() < TOL && (var.sqrt() - 1.0).abs() < 1e-3);
    assert_close(&out.returns, &[vec![0.71712, 0.846, 1.0]]);
}

#[test]
fn gae_skips_masked_tokens() {
    // Mask [1, 0, 1]: the masked token's value (9.9) must not be used; γ = λ = 1.
    let values = vec![vec![0.5, 9.9, 0.7]];
    let mask = vec![vec![true, false, true]];
    let out = Gae {
        gamma: 1.0,
        lambda: 1.0,
        whiten: false,
    }
    .compute(
        &AdvantageInput::new(&[1.0], &[0], &[3])
            .with_values(&values)
            .with_response_mask(&mask),
    )
    .unwrap();
    assert_close(&out.advantages, &[vec![0.5, 0.0, 0.3]]);
}

fn random_batch(seed: u64) -> (Vec<f32>, Vec<u64>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rewards = Vec::new();
    let mut groups = Vec::new();
    let mut lengths = Vec::new();
    for g in 0..20u64 {
        let size = 2 + (rng.next_u32() % 7) as usize;
        for _ in 0..size {
            rewards.push((rng.next_u32() % 1000) as f32 / 100.0 - 5.0);
            groups.push(g * 7919); // non-contiguous ids
            lengths.push(1 + (rng.next_u32() % 5) as usize);
        }
    }
    // Shuffle so groups are interleaved.
    for i in (1..rewards.len()).rev() {
        let j = (rng.next_u32() as usize) % (i + 1);
        rewards.swap(i, j);
        groups.swap(i, j);
        lengths.swap(i, j);
    }
    (rewards, groups, lengths)
}

fn members(groups: &[u64]) -> std::collections::BTreeMap<u64, Vec<usize>> {
    let mut m: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
    for (i, g) in groups.iter().enumerate() {
        m.entry(*g).or_default().push(i);
    }
    m
}

#[test]
fn grpo_groups_sum_to_zero_with_unit_std() {
    for seed in 0..5 {
        let (rewards, groups, lengths) = random_batch(seed);
        let out = Grpo::default()
            .compute(&AdvantageInput::new(&rewards, &groups, &lengths))
            .unwrap();
        for idx in members(&groups).values() {
            let a: Vec<f64> = idx
                .iter()
                .map(|&i| f64::from(out.advantages[i][0]))
                .collect();
            let r: Vec<f64> = idx.iter().map(|&i| f64::from(rewards[i])).collect();
            let n = a.len() as f64;
            let sum: f64 = a.iter().sum();
            assert!(sum.abs() < 1e-4, "group sum {sum}");
            let r_mean = r.iter().sum::<f64>() / n;
            let r_std = (r.iter().map(|x| (x - r_mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            let std = (a.iter().map(|x| (x - sum / n).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            if r_std > 1e-3 {
                assert!((std - 1.0).abs() < 1e-3, "group std {std}");
            } else {
                assert!(std < 1e-6);
            }
            // Every token of a sequence carries its sequence's advantage.
            for &i in idx {
                assert_eq!(out.advantages[i].len(), lengths[i]);
                assert!(out.advantages[i].iter().all(|&x| x == out.advantages[i][0]));
            }
        }
    }
}

#[test]
fn rloo_equals_closed_form() {
    for seed in 10..15 {
        let (rewards, groups, lengths) = random_batch(seed);
        let out = Rloo::default()
            .compute(&AdvantageInput::new(&rewards, &groups, &lengths))
            .unwrap();
        for idx in members(&groups).values() {
            for &i in idx {
                let others: Vec<f64> = idx
                    .iter()
                    .filter(|&&j| j != i)
                    .map(|&j| f64::from(rewards[j]))
                    .collect();
                let baseline = others.iter().sum::<f64>() / others.len() as f64;
                let expected = f64::from(rewards[i]) - baseline;
                assert!((f64::from(out.advantages[i][0]) - expected).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn gae_lambda_one_gamma_one_is_returns_minus_values() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut f = move || (rng.next_u32() % 2000) as f32 / 1000.0 - 1.0;
    let lengths = [5usize, 1, 8, 3];
    let rewards: Vec<f32> = lengths.iter().map(|_| f()).collect();
    let values: Vec<Vec<f32>> = lengths
        .iter()
        .map(|&l| (0..l).map(|_| f()).collect())
        .collect();
    let token_rewards: Vec<Vec<f32>> = lengths
        .iter()
        .map(|&l| (0..l).map(|_| 0.1 * f()).collect())
        .collect();
    let gae = Gae {
        gamma: 1.0,
        lambda: 1.0,
        whiten: false,
    };
    let groups = [0u64, 1, 2, 3];
    let out = gae
        .compute(
            &AdvantageInput::new(&rewards, &groups, &lengths)
                .with_values(&values)
                .with_token_rewards(&token_rewards),
        )
        .unwrap();
    for i in 0..lengths.len() {
        for t in 0..lengths[i] {
            let ret: f32 = token_rewards[i][t..].iter().sum::<f32>() + rewards[i];
            assert!((out.advantages[i][t] - (ret - values[i][t])).abs() < 1e-5);
            assert!((out.returns[i][t] - ret).abs() < 1e-5);
        }
    }
}

#[test]
fn zero_variance_groups_get_zero_advantage() {
    let rewards = [0.7, 0.7, 0.7, 1.0, 1.0, 0.0, 1.0];
    let groups = [5, 5, 5, 9, 9, 4, 4];
    let lengths = [2, 3, 1, 4, 1, 2, 2];
    let estimators: Vec<Box<dyn AdvantageEstimator>> = vec![
        Box::new(Grpo::default()),
        Box::new(DrGrpo::default()),
        Box::new(Rloo::default()),
    ];
    for est in estimators {
        let out = est
            .compute(&AdvantageInput::new(&rewards, &groups, &lengths))
            .unwrap();
        for i in 0..5 {
            assert!(
                out.advantages[i].iter().all(|&a| a == 0.0),
                "{}: seq {i} {:?}",
                est.name(),
                out.advantages[i]
            );
        }
        assert!(out.advantages[5][0] < 0.0 && out.advantages[6][0] > 0.0);
    }
}

#[test]
fn token_rewards_change_the_score_and_mask_zeroes_tokens() {
    // Sequence scores = reward + Σ token rewards: [1 - 0.5, 1] → GRPO sees different scores.
    let token_rewards = vec![vec![-0.25, -0.25], vec![0.0, 0.0, 0.0]];
    let mask = vec![vec![true, true], vec![true, false, true]];
    let out = DrGrpo::default()
        .compute(
            &AdvantageInput::new(&[1.0, 1.0], &[0, 0], &[2, 3])
                .with_token_rewards(&token_rewards)
                .with_response_mask(&mask),
        )
        .unwrap();
    assert_close(
        &out.advantages,
        &[vec![-0.25, -0.25], vec![0.25, 0.0, 0.25]],
    );
}

#[test]
fn invalid_inputs_are_errors() {
    let est = Grpo::default();
    assert!(est
        .compute(&AdvantageInput::new(&[1.0, 2.0], &[0], &[1, 1]))
        .is_err());
    assert!(est
        .compute(&AdvantageInput::new(&[f32::NAN], &[0], &[1]))
        .is_err());
    let bad_tokens = vec![vec![0.0; 3]];
    assert!(est
        .compute(&AdvantageInput::new(&[1.0], &[0], &[2]).with_token_rewards(&bad_tokens))
        .is_err());
    let err = Gae::default()
        .compute(&AdvantageInput::new(&[1.0], &[0], &[2]))
        .unwrap_err();
    assert!(err.to_string().contains("critic values"), "{err}");
    // Empty batches are fine.
    let out = est.compute(&AdvantageInput::new(&[], &[], &[])).unwrap();
    assert!(out.advantages.is_empty());
}

#[test]
fn broadcast_over_lengths_and_mask() {
    let out = broadcast_to_tokens(&[2.0, -1.0, 3.0], &[3, 0, 2], None);
    assert_eq!(out, vec![vec![2.0; 3], vec![], vec![3.0; 2]]);
    let mask = vec![vec![false, true]];
    assert_eq!(
        broadcast_to_tokens(&[4.0], &[2], Some(&mask)),
        vec![vec![0.0, 4.0]]
    );
}

#[test]
fn dynamic_sampling_filter_and_refill() {
    let f = filter_zero_variance_groups(
        &[1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.0, 1.0],
        &[3, 3, 8, 8, 1, 1, 1, 2, 2],
    );
    assert_eq!(f.kept_groups, vec![8, 2]);
    assert_eq!(f.dropped_groups, vec![3, 1]);
    assert_eq!(f.kept_sequences, vec![2, 3, 7, 8]);
    assert_eq!(f.dropped_sequences, 5);

    let mut s = DynamicSampler::new(3, 3);
    assert_eq!(s.suggested_prompts(), 3);
    let kept = s.add_round((0..4).map(|g| {
        (
            g,
            if g % 2 == 0 {
                vec![1.0, 1.0]
            } else {
                vec![0.0, 1.0]
            },
        )
    }));
    assert_eq!(kept, 2);
    assert!(!s.is_done());
    assert_eq!(s.groups_needed(), 1);
    assert_eq!(s.suggested_prompts(), 2); // half of the groups were informative
    s.add_round(vec![(10, vec![0.0, 0.0])]);
    assert!(!s.is_done());
    s.add_round(vec![(11, vec![0.0, 0.0])]);
    assert!(s.is_done(), "round limit reached");
    let (groups, stats) = s.finish();
    assert_eq!(groups, vec![1, 3]);
    assert!(!stats.full);
    assert_eq!(stats.groups_dropped, 4);
    assert_eq!(stats.rounds, 3);
}
