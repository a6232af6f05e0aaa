//! Benchmark: load a 100,000-row Parquet file in verl's prompt layout (target: < 2 s).
//!
//! Run: `cargo bench -p rlrun-rollout --bench parquet_load` (optionally `-- <rows>`).
//! The file is written first (snappy, like pyarrow's default) with the parquet crate; only the
//! load (`rlrun_rollout::data::load_parquet`: decode, convert every row to a `Sample`) is timed.

#[path = "../tests/common/verl_parquet.rs"]
mod verl_parquet;

use std::time::Instant;

use rlrun_rollout::data::load_parquet;
use rlrun_rollout::FileDatasetConfig;

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("verl_train.parquet");
    let t = Instant::now();
    verl_parquet::write_verl_parquet(&path, rows, None)?;
    let write_s = t.elapsed().as_secs_f64();
    let size_mb = std::fs::metadata(&path)?.len() as f64 / 1e6;

    let config = FileDatasetConfig::new(&path);
    let mut times = Vec::new();
    let mut loaded = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let ds = load_parquet(&config)?;
        times.push(t.elapsed().as_secs_f64());
        loaded = ds.len();
    }
    times.sort_by(f64::total_cmp);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {} ({cores} cores available)", cpu_model());
    println!("file: {rows} rows, {size_mb:.1} MB (written in {write_s:.2} s)");
    println!(
        "load_parquet: {loaded} samples; min {:.3} s, median {:.3} s, max {:.3} s over {} runs ({:.0} rows/s at median)",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        times.len(),
        rows as f64 / times[times.len() / 2]
    );
    let target = 2.0;
    println!(
        "target < {target} s: {}",
        if times[times.len() / 2] < target {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
