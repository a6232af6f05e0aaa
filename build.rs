include!("build_support/torch_link.rs");

fn main() {
    torch_link_args();
    // The git commit goes into every run's manifest.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    if let Ok(out) = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
    {
        if out.status.success() {
            let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
            println!("cargo:rustc-env=RLRUN_GIT_COMMIT={commit}");
        }
    }
}
