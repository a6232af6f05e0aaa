//! LoRA through the `rlrun` binary: a run with the trainer and the generator in their own
//! processes moves only the adapters (and the generator's log-probs are the trainer's), the KL
//! reference is the base, the export is a merged model plus a PEFT adapter, and a second run
//! started from that adapter evaluates exactly where the first one ended.

mod common;

use common::*;
use rlrun_model::lora::{self, LoraConfig};
use rlrun_model::{Device, Kind, ModelFiles};
use rlrun_testkit::{fixtures, max_abs_diff, read_safetensors};

fn evals(m: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    m.iter().filter(|l| l["kind"] == "eval").collect()
}

#[test]
fn a_lora_run_syncs_adapters_exports_peft_and_restarts_from_its_adapter() {
    let tmp = rlrun_testkit::tempdir();
    let mut o = tiny(tmp.path());
    o.retain(|x| !x.starts_with("eval.every") && !x.starts_with("checkpoint.every"));
    o.extend([
        "model.lora.rank=4".into(),
        "trainer.lr=1e-2".into(),
        "algorithm.loss.kl={ coef = 0.01 }".into(),
        // Rewards of a tiny random model are all zero: the entropy bonus moves the adapters.
        "algorithm.loss.entropy_coef=0.01".into(),
        "placement.trainer_process=true".into(),
        "placement.generator_processes=1".into(),
        "sync.probe=true".into(),
        "checkpoint.export_hf=true".into(),
        "eval.before=true".into(),
        "eval.after=true".into(),
    ]);
    let mut args = vec!["recipes/quickstart_lora.toml".to_string()];
    args.extend(set_args(&o));
    let out = rlrun(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = run_dir(tmp.path());
    let m = metrics(&run);
    let files = ModelFiles::open(&fixtures().join("tiny-llama3")).unwrap();
    let lcfg = LoraConfig {
        rank: 4,
        ..Default::default()
    };
    let adapter_bytes = lcfg.layout(&files.config).numel() as f64 * 4.0;
    let train: Vec<_> = m.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 2);
    for l in &train {
        assert_eq!(l["sync/bytes"].as_f64().unwrap(), adapter_bytes, "{l}");
        assert_eq!(l["sync/backend_shm"].as_f64().unwrap(), 1.0);
        let probe = l["sync/probe_logprob_max_diff"].as_f64().unwrap();
        assert!(probe < 1e-4, "generator vs trainer log-probs {probe}");
        assert!(l["actor/kl"].is_number(), "{l}");
    }
    // The export: a PEFT adapter, and the model with it merged (= base + adapter in the forward).
    let final_dir = run.join("final");
    let (cfg, adapters) = lora::load_peft(&final_dir.join("adapter"), &files.config).unwrap();
    assert_eq!(cfg.rank, 4);
    let base = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let merged_files = ModelFiles::open(&final_dir).unwrap();
    let merged = merged_files.load_weights(Kind::Float, Device::Cpu).unwrap();
    let r = read_safetensors(&files.path.join("reference.safetensors"));
    let logits = |model: rlrun_model::Model| {
        let _g = tch::no_grad_guard();
        let h = model
            .forward(
                &r["input_ids"],
                &r["position_ids"],
                Some(&r["attention_mask"]),
            )
            .unwrap();
        model.logits(&h).unwrap()
    };
    let with_adapter = logits(
        rlrun_model::build_model_with_lora(files.config.clone(), &base, &adapters, cfg.scale())
            .unwrap(),
    );
    let exported = logits(rlrun_model::build_model(files.config.clone(), &merged).unwrap());
    let plain = logits(rlrun_model::build_model(files.config.clone(), &base).unwrap());
    assert!(max_abs_diff(&with_adapter, &exported) < 1e-4);
    assert!(
        max_abs_diff(&with_adapter, &plain) > 1e-3,
        "training left the adapters at zero"
    );

    // A second run from the exported adapter starts where the first ended: its evaluation before
    // training equals the first run's after training (greedy, same problems), and the manifest
    // records the adapter's files.
    let tmp2 = rlrun_testkit::tempdir();
    let mut o2: Vec<String> = tiny(tmp2.path())
        .into_iter()
        .filter(|x| !x.starts_with("steps=") && !x.starts_with("eval.every"))
        .collect();
    o2.extend([
        "steps=1".into(),
        "eval.every=0".into(),
        "eval.before=true".into(),
        "eval.after=false".into(),
        format!(
            "model.lora.init=\"{}\"",
            final_dir.join("adapter").display()
        ),
    ]);
    let mut args = vec!["recipes/quickstart_lora.toml".to_string()];
    args.extend(set_args(&o2));
    let out = rlrun(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run2 = run_dir(tmp2.path());
    let first_after = *evals(&m).last().unwrap();
    let second_before = evals(&metrics(&run2))[0].clone();
    assert_eq!(second_before["step"], 0);
    for k in ["eval/accuracy", "eval/mean_reward", "eval/response_length"] {
        assert_eq!(first_after[k], second_before[k], "{k}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run2.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["model"]["lora_init"].as_array().unwrap().len(), 2);
}
