//! Compiles `csrc/ext.cpp` against the torch that tch links (the venv's, found as torch-sys does
//! with LIBTORCH_USE_PYTORCH=1). It uses only device-generic ATen APIs (the accelerator's
//! allocator, not CUDA headers, which PyPI's CUDA wheels do not fully ship), so the same build
//! runs on CPU machines and, with torch's CUDA libraries linked by the binaries, on GPUs.

include!("../build_support/torch_link.rs");

fn python() -> std::path::PathBuf {
    match std::env::var("VIRTUAL_ENV") {
        Ok(venv) => std::path::PathBuf::from(venv).join("bin").join("python"),
        Err(_) => std::path::PathBuf::from("python3"),
    }
}

/// torch's `_GLIBCXX_USE_CXX11_ABI` (1 for PyPI's torch 2.x on Linux).
fn cxx11_abi() -> String {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "1".into(),
    }
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/ext.cpp");
    // Its own test executable runs without LD_LIBRARY_PATH, like every crate's.
    torch_link_args();
    let lib = torch_lib_dir().expect("torch not found: set VIRTUAL_ENV (or LIBTORCH)");
    let root = lib.parent().expect("torch/lib has a parent").to_path_buf();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/ext.cpp");
    build.compile("rlrun_torch_ext");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
