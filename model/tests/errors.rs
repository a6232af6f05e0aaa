//! Bad input gives a clear error naming the file and tensor, never a panic: missing files,
//! truncated safetensors, shape mismatches, missing tensors, unknown architectures.

use std::path::Path;

use rlrun_model::{Device, Kind, ModelError, ModelFiles};
use rlrun_testkit::{fixtures, tempdir};

fn copy_model(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn open_and_load(dir: &Path) -> Result<(), ModelError> {
    let files = ModelFiles::open(dir)?;
    files.load_weights(Kind::Float, Device::Cpu).map(|_| ())
}

#[test]
fn missing_directory_and_files_are_named() {
    let tmp = tempdir();
    let err = open_and_load(&tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing file") && err.contains("nope"),
        "{err}"
    );

    let dir = tmp.path().join("m");
    copy_model("tiny-qwen2", &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = open_and_load(&dir).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    copy_model("tiny-qwen2", &dir);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = open_and_load(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");

    copy_model("tiny-qwen2", &dir);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = open_and_load(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    copy_model("tiny-qwen3", &dir);
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let err = open_and_load(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ModelError::Safetensors { .. }),
            "cut {cut}: {msg}"
        );
        assert!(msg.contains("model.safetensors"), "{msg}");
    }
    std::fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let msg = open_and_load(&dir).unwrap_err().to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn shape_mismatch_names_tensor_file_and_shapes() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    copy_model("tiny-llama3", &dir);
    // The config claims a wider MLP than the checkpoint has.
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(
        msg.contains("[100, 64]") && msg.contains("[128, 64]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_names_tensor_and_shard() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    copy_model("tiny-llama3", &dir);
    // Claim more layers than the checkpoint holds.
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = open_and_load(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("model.layers.2.input_layernorm.weight") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_is_named_with_the_supported_list() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    copy_model("tiny-qwen2", &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = "mamba".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = open_and_load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("mamba")
            && msg.contains(&rlrun_model::config::SUPPORTED_MODEL_TYPES.join(", "))
            && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn corrupt_config_json_names_the_file() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    copy_model("tiny-qwen2", &dir);
    std::fs::write(dir.join("config.json"), "{\"model_type\": ").unwrap();
    let msg = open_and_load(&dir).unwrap_err().to_string();
    assert!(msg.contains("config.json") && msg.contains("JSON"), "{msg}");
}
