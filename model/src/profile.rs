//! Opt-in phase timing for diagnosis (`RLRUN_PROFILE=1`): each mark synchronizes the device and
//! adds the time since the previous mark to a named per-thread total. Synchronizing costs time
//! itself, so figures are for finding where time goes, not for throughput.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

thread_local! {
    static STATE: RefCell<(Option<Instant>, BTreeMap<String, f64>)> = const { RefCell::new((None, BTreeMap::new())) };
}

/// Whether `RLRUN_PROFILE=1`.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RLRUN_PROFILE").is_ok_and(|v| v == "1"))
}

fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Starts timing from now.
pub fn start(device: tch::Device) {
    if !enabled() {
        return;
    }
    sync(device);
    STATE.with(|s| s.borrow_mut().0 = Some(Instant::now()));
}

/// Adds the time since the last mark (or start) to `phase`.
pub fn mark(device: tch::Device, phase: &str) {
    if !enabled() {
        return;
    }
    sync(device);
    let now = Instant::now();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if let Some(t) = s.0 {
            *s.1.entry(phase.to_string()).or_insert(0.0) += (now - t).as_secs_f64();
        }
        s.0 = Some(now);
    });
}

/// The totals of this thread, cleared.
pub fn take() -> BTreeMap<String, f64> {
    STATE.with(|s| std::mem::take(&mut s.borrow_mut().1))
}
