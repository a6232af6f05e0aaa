// Shared build-script code, `include!`d by the build.rs of every crate whose binaries or test
// executables link libtorch. It makes them run without LD_LIBRARY_PATH (rpath to torch's lib dir)
// and links libtorch_cuda.so when torch has it, so one build uses CUDA on a GPU machine: without
// `--no-as-needed` the linker drops libtorch_cuda (no symbol of it is referenced) and CUDA is
// silently unavailable. Link args are set here and not in RUSTFLAGS, which would hit build scripts.

fn torch_lib_dir() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(std::path::PathBuf::from(dir).join("lib"));
    }
    // Same interpreter choice as torch-sys with LIBTORCH_USE_PYTORCH=1.
    let python = match std::env::var("VIRTUAL_ENV") {
        Ok(venv) => std::path::PathBuf::from(venv).join("bin").join("python"),
        Err(_) => std::path::PathBuf::from("python3"),
    };
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    Some(std::path::PathBuf::from(dir))
}

#[allow(dead_code)]
fn torch_link_args() {
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=torch not found: binaries will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    // NCCL (loaded by cudarc at run time) ships as site-packages/nvidia/nccl/lib/libnccl.so.2.
    if let Some(site) = lib.parent().and_then(|t| t.parent()) {
        let nccl = site.join("nvidia").join("nccl").join("lib");
        if nccl.exists() {
            println!("cargo:rustc-env=RLRUN_NCCL_DIR={}", nccl.display());
        }
    }
}
