//! GGUF: dequantization of every supported tensor type against gguf-py (the reference
//! implementation maintained with llama.cpp), and clear errors for unsupported types.
//!
//! Supported (each checked bit-exactly): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
//! Q4_K, Q5_K and Q6_K. The fixture's unsupported example is IQ4_NL.

use rlrun_model::gguf::GgufFile;
use rlrun_model::ModelError;
use rlrun_testkit::{fixtures, read_safetensors};
use tch::Tensor;

#[test]
fn every_supported_type_dequantizes_like_gguf_py() {
    let dir = fixtures();
    let file = GgufFile::open(&dir.join("quants.gguf")).unwrap();
    let reference = read_safetensors(&dir.join("quants-reference.safetensors"));
    let mut checked = Vec::new();
    for (name, want) in &reference {
        let t = file.tensor(name).unwrap();
        let got = Tensor::from_slice(&file.dequantize(t).unwrap()).view(t.shape().as_slice());
        assert_eq!(got.size(), want.size(), "{name}");
        let diff = (&got - want).abs().max().double_value(&[]);
        assert!(diff == 0.0, "{name}: max |Δ| = {diff:e} vs gguf-py");
        checked.push(name.clone());
    }
    checked.sort();
    assert_eq!(checked.len(), 13, "{checked:?}");
    // Every type in the Gemma 3 270M Q4_K_M file (llama.cpp's default K-quant mix) is covered.
    for ty in ["F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"] {
        assert!(
            checked.contains(&format!("t_{ty}")),
            "{ty} not checked: {checked:?}"
        );
    }
}

#[test]
fn unsupported_type_names_tensor_file_and_type() {
    let path = fixtures().join("quants.gguf");
    let file = GgufFile::open(&path).unwrap();
    let t = file.tensor("t_IQ4_NL").unwrap();
    let err = file.dequantize(t).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedGgufType { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("t_IQ4_NL") && msg.contains("type IQ4_NL") && msg.contains("quants.gguf"),
        "{msg}"
    );
}

#[test]
fn truncated_gguf_is_an_error_naming_the_file() {
    let src = std::fs::read(fixtures().join("quants.gguf")).unwrap();
    let tmp = rlrun_testkit::tempdir();
    for cut in [3usize, 20, 200, src.len() - 100] {
        let p = tmp.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &src[..cut]).unwrap();
        let msg = match GgufFile::open(&p) {
            Err(e) => e.to_string(),
            Ok(f) => {
                // Header intact: the tensor that runs past the end reports it.
                let errs: Vec<String> = f
                    .tensors
                    .iter()
                    .filter_map(|t| f.dequantize(t).err().map(|e| e.to_string()))
                    .collect();
                assert!(!errs.is_empty(), "cut at {cut}: no error");
                errs.join("; ")
            }
        };
        assert!(msg.contains(&format!("cut{cut}.gguf")), "{msg}");
    }
}
