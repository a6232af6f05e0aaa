//! RewardRunner: parallel scoring with panic, time-limit and non-finite isolation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rlrun_rollout::*;

/// Behaves according to the completion text: `panic`, `error`, `sleep:<ms>`, `nan`, or a number.
struct Scripted {
    calls: AtomicUsize,
}

impl RewardFn for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn score(&self, _sample: &Sample, completion: &Completion<'_>) -> Result<Reward, RewardError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let text = completion.text;
        if text == "panic" {
            panic!("scripted panic");
        }
        if text == "error" {
            return Err(RewardError::new("scripted error"));
        }
        if let Some(ms) = text.strip_prefix("sleep:") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            return Ok(Reward::new(0.5).with_metric("slept", 1.0));
        }
        if text == "nan" {
            return Ok(Reward::new(f32::NAN));
        }
        let v: f32 = text.parse().unwrap_or(0.0);
        Ok(Reward::new(v).with_metric("value_seen", v))
    }
}

fn jobs(texts: &[&str]) -> Vec<ScoreJob> {
    let sample = Arc::new(Sample::new(0, Prompt::text("q")));
    texts
        .iter()
        .map(|t| ScoreJob::new(sample.clone(), OwnedCompletion::from_text(*t)))
        .collect()
}

fn runner(threads: usize, timeout_secs: f64, failure_score: f32) -> (RewardRunner, Arc<Scripted>) {
    let reward = Arc::new(Scripted {
        calls: AtomicUsize::new(0),
    });
    let r = RewardRunner::new(
        reward.clone(),
        RewardRunnerConfig {
            num_threads: Some(threads),
            timeout_secs,
            failure_score,
        },
    )
    .unwrap();
    (r, reward)
}

#[test]
fn scores_in_order_and_aggregates_metrics() {
    let (runner, scripted) = runner(3, 5.0, 0.0);
    let texts: Vec<String> = (0..50).map(|i| (i as f32 / 10.0).to_string()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (rewards, stats) = runner.score_batch(jobs(&refs));
    for (i, r) in rewards.iter().enumerate() {
        assert_eq!(r.value, i as f32 / 10.0);
    }
    assert_eq!(scripted.calls.load(Ordering::SeqCst), 50);
    assert_eq!(stats.count, 50);
    assert!((stats.mean - 2.45).abs() < 1e-5);
    assert!((stats.metrics["value_seen"] - 2.45).abs() < 1e-5);
    assert_eq!(stats.panics + stats.timeouts + stats.non_finite, 0);
    let m = stats.to_metrics("reward");
    assert_eq!(m["reward/panics"], 0.0);
    assert!(m.contains_key("reward/value_seen"));
    let (empty, stats) = runner.score_batch(Vec::new());
    assert!(empty.is_empty());
    assert_eq!(stats.mean, 0.0);
}

#[test]
fn a_panicking_reward_scores_the_failure_value_and_is_counted() {
    let (runner, _) = runner(2, 5.0, -1.0);
    let (rewards, stats) = runner.score_batch(jobs(&["1", "panic", "0.5", "panic", "nan"]));
    let values: Vec<f32> = rewards.iter().map(|r| r.value).collect();
    assert_eq!(values, [1.0, -1.0, 0.5, -1.0, -1.0]);
    assert_eq!(stats.panics, 2);
    assert_eq!(stats.non_finite, 1);
    assert_eq!(
        stats.failures,
        vec![
            (1, Failure::Panic),
            (3, Failure::Panic),
            (4, Failure::NonFinite)
        ]
    );
    // Metrics average only over successful calls.
    assert!((stats.metrics["value_seen"] - 0.75).abs() < 1e-6);
    // Workers survived the panics.
    assert_eq!(runner.num_workers(), 2);
    let (rewards, stats) = runner.score_batch(jobs(&["2", "3"]));
    assert_eq!(rewards[1].value, 3.0);
    assert_eq!(stats.panics, 0);
}

#[test]
fn a_reward_that_returns_an_error_scores_the_failure_value_and_is_counted() {
    let (runner, _) = runner(2, 5.0, -1.0);
    let (rewards, stats) = runner.score_batch(jobs(&["1", "error", "panic", "error"]));
    let values: Vec<f32> = rewards.iter().map(|r| r.value).collect();
    assert_eq!(values, [1.0, -1.0, -1.0, -1.0]);
    assert_eq!((stats.errors, stats.panics), (2, 1));
    assert_eq!(
        stats.failures,
        vec![
            (1, Failure::Error),
            (2, Failure::Panic),
            (3, Failure::Error)
        ]
    );
    let m = stats.to_metrics("reward");
    assert_eq!(m["reward/errors"], 2.0);
    assert_eq!(m["reward/panics"], 1.0);
}

#[test]
fn a_reward_that_sleeps_past_its_limit_does_not_block_the_batch() {
    let (runner, _) = runner(2, 0.2, 0.0);
    // Two calls hang for 3 s; with 2 threads they would block everything without isolation.
    let (rewards, stats) = runner.score_batch(jobs(&[
        "sleep:3000",
        "sleep:3000",
        "1",
        "2",
        "sleep:10",
        "3",
    ]));
    let values: Vec<f32> = rewards.iter().map(|r| r.value).collect();
    assert_eq!(values, [0.0, 0.0, 1.0, 2.0, 0.5, 3.0]);
    assert_eq!(stats.timeouts, 2);
    assert_eq!(
        stats.failures,
        vec![(0, Failure::Timeout), (1, Failure::Timeout)]
    );
    // The batch returned while the hung calls were still running (not by waiting them out).
    assert_eq!(stats.leaked_threads, 2, "two threads are still stuck");
    // The pool was refilled: a later batch gets its full width of workers.
    assert_eq!(runner.num_workers(), 2);
    let (rewards, stats) = runner.score_batch(jobs(&["sleep:100", "sleep:100", "4"]));
    assert_eq!(rewards[2].value, 4.0);
    assert_eq!(stats.timeouts, 0);
    // Once the stuck calls return, their threads exit instead of taking work.
    std::thread::sleep(Duration::from_millis(3200));
    let (_, stats) = runner.score_batch(jobs(&["5"]));
    assert_eq!(stats.leaked_threads, 0);
    assert_eq!(runner.num_workers(), 2);
}

#[test]
fn time_limit_counts_from_start_of_the_call_not_queueing() {
    // One thread, five 100 ms calls, 250 ms limit: each call is within its limit even though the
    // last one finishes 500 ms after the batch started.
    let (runner, _) = runner(1, 0.25, 0.0);
    let (rewards, stats) = runner.score_batch(jobs(&["sleep:100"; 5]));
    assert_eq!(stats.timeouts, 0);
    assert!(rewards.iter().all(|r| r.value == 0.5));
}

#[test]
fn real_rewards_through_the_runner() {
    let cfg: RewardConfig = toml::from_str(
        r#"
        name = "weighted-sum"
        terms = [
          { weight = 1.0, reward = { name = "math" } },
          { weight = 0.1, reward = { name = "format", pattern = '(?s)^<think>.*</think>' } },
        ]
        "#,
    )
    .unwrap();
    let runner = RewardRunner::new(cfg.build().unwrap(), RewardRunnerConfig::default()).unwrap();
    let sample = Arc::new(
        Sample::new(0, Prompt::user("1/2 as a fraction?")).with_ground_truth("\\frac{1}{2}"),
    );
    let texts = [
        "<think>half</think> \\boxed{\\dfrac12}",
        "\\boxed{0.5}",
        "<think>hmm</think> \\boxed{2}",
        "",
    ];
    let (rewards, stats) = runner.score_batch(
        texts
            .iter()
            .map(|t| ScoreJob::new(sample.clone(), OwnedCompletion::from_text(*t)))
            .collect(),
    );
    let values: Vec<f32> = rewards.iter().map(|r| r.value).collect();
    assert_eq!(values, [1.1, 1.0, 0.1, 0.0]);
    assert!((stats.metrics["math/has_boxed"] - 0.75).abs() < 1e-6);
    assert!((stats.metrics["format"] - 0.5).abs() < 1e-6);
}

#[test]
fn invalid_runner_configs_are_rejected() {
    let reward: Arc<dyn RewardFn> = Arc::new(NumberMatch::gsm8k());
    for cfg in [
        RewardRunnerConfig {
            num_threads: Some(0),
            ..Default::default()
        },
        RewardRunnerConfig {
            timeout_secs: 0.0,
            ..Default::default()
        },
        RewardRunnerConfig {
            timeout_secs: f64::INFINITY,
            ..Default::default()
        },
        RewardRunnerConfig {
            failure_score: f32::NAN,
            ..Default::default()
        },
    ] {
        assert!(RewardRunner::new(reward.clone(), cfg).is_err());
    }
}
