//! `rlrun bench` against its peer on the tiny model: every round's ratio is reported, the
//! training peer runs as verl does (f32 weights, autocast) with a pure 16-bit second line, and
//! generation runs the production decode path (EOS on) at each requested batch size.
//! (Throughput itself is measured by the benchmarks, never asserted here.)

mod common;

use common::*;
use serde_json::Value;

fn bench_json(args: &[&str]) -> (Value, String) {
    let tmp = rlrun_testkit::tempdir();
    let json = tmp.path().join("out.json");
    let model = rlrun_testkit::fixtures().join("tiny-llama3");
    let mut a: Vec<String> = vec!["bench".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.extend([
        "--model".into(),
        model.display().to_string(),
        "--json".into(),
        json.display().to_string(),
    ]);
    let out = rlrun(&a);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rlrun {a:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (v, stdout)
}

#[test]
fn bf16_training_bench_compares_with_a_verl_style_and_a_pure_bf16_peer_each_round() {
    let (v, stdout) = bench_json(&[
        "train", "--dtype", "bf16", "--batch", "2", "--seq", "16", "--iters", "1", "--rounds", "3",
    ]);
    let peers = v["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{v}");
    let settings: Vec<&str> = peers
        .iter()
        .map(|p| p["median"]["settings"].as_str().unwrap())
        .collect();
    assert!(settings[0].contains("weights float32") && settings[0].contains("autocast bfloat16"));
    assert!(settings[1].contains("weights bfloat16"));
    for p in peers {
        assert_eq!(p["round_ratios"].as_array().unwrap().len(), 3);
        assert_eq!(p["median"]["entropy"], false);
    }
    assert_eq!(v["rlrun_rounds"].as_array().unwrap().len(), 3);
    // Both sides' threads and the allocator settings are the same and printed.
    let threads = peers[0]["median"]["threads"].as_u64().unwrap();
    assert!(
        stdout.contains(&format!("torch threads {threads}")),
        "{stdout}"
    );
    assert_eq!(
        peers[0]["median"]["allocator"]["MALLOC_TOP_PAD_"],
        "268435456"
    );
    assert!(stdout.contains("each of 3 alternating rounds"), "{stdout}");
}

#[test]
fn generation_bench_sweeps_batch_sizes_with_eos_on_both_sides() {
    let (v, stdout) = bench_json(&[
        "generate",
        "--sizes",
        "1,4",
        "--n",
        "2",
        "--prompt-len",
        "6",
        "--max-new",
        "8",
        "--rounds",
        "1",
    ]);
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (r, batch) in runs.iter().zip([1, 4]) {
        assert_eq!(r["batch"], batch, "{r}");
        assert_eq!(r["eos"], true);
        assert_eq!(r["prefill_budget"], 16_384);
        let peer = &r["peers"][0]["median"];
        assert_eq!(peer["eos"], true, "{peer}");
        assert!(peer["mean_len"].as_f64().unwrap() <= 8.0);
    }
    assert!(stdout.contains("each sequence ends at EOS"), "{stdout}");
}
