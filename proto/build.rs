// Compiles proto/rlrun.proto with a vendored protoc (no system protoc needed).
fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/rlrun.proto");
    tonic_prost_build::configure()
        // Weight chunks are slices of one buffer: sent and received without copying.
        .bytes(".rlrun.v1.WeightChunk.data")
        .compile_protos(&["proto/rlrun.proto"], &["proto"])
        .expect("compiling proto/rlrun.proto");
}
