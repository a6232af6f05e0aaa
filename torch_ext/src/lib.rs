//! What tch does not expose, from a small C++ shim over libtorch (`csrc/ext.cpp`, compiled by the
//! build script against the torch tch links): PyTorch's fused AdamW kernel, and the device
//! (CUDA) caching allocator's statistics.

use std::ffi::{c_char, CStr};

use tch::Tensor;

extern "C" {
    fn rlrun_ext_free(p: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    fn rlrun_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        steps: *const *mut torch_sys::C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn rlrun_device_memory(device: i32, reset: i32, out: *mut i64) -> *mut c_char;
}

/// The shim's error (a C++ exception's message), or `Ok`.
fn check(e: *mut c_char) -> Result<(), String> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string the shim allocated; freed once, here.
    let m = unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned();
    unsafe { rlrun_ext_free(e) };
    Err(m)
}

fn handles(ts: &[Tensor]) -> Vec<*mut torch_sys::C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut _).collect()
}

/// AdamW hyper-parameters of one fused step.
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One step of `torch.optim.AdamW(fused=True)` (non-amsgrad) over equal-length lists of
/// parameters, gradients and moments (same dtype and device, each contiguous), in place; `steps`
/// holds each parameter's step count after this step (torch increments it before the kernel).
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    h: AdamW,
) -> Result<(), String> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()] != [n; 4] {
        return Err("fused AdamW: lists of different lengths".into());
    }
    let (p, g, m, v, s) = (
        handles(params),
        handles(grads),
        handles(exp_avgs),
        handles(exp_avg_sqs),
        handles(steps),
    );
    // SAFETY: `n` live tensor handles in each list, borrowed for the call; the kernel writes the
    // parameters and moments in place, which the caller owns mutably in spirit (no other views
    // are used meanwhile).
    check(unsafe {
        rlrun_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    })
}

/// The CUDA caching allocator's figures on one device, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaMemory {
    pub allocated: i64,
    pub reserved: i64,
    pub peak_allocated: i64,
    pub peak_reserved: i64,
}

/// The caching allocator's figures on CUDA device `device` (peaks since the last reset), then
/// restarts the peaks when `reset_peak`.
pub fn cuda_memory(device: usize, reset_peak: bool) -> Result<CudaMemory, String> {
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        return Err(format!("no CUDA device {device}"));
    }
    device_memory(device, reset_peak)
}

/// [`cuda_memory`] without the check (torch's own error without an accelerator).
fn device_memory(device: usize, reset_peak: bool) -> Result<CudaMemory, String> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has the four slots the shim fills.
    check(unsafe { rlrun_device_memory(device as i32, i32::from(reset_peak), out.as_mut_ptr()) })?;
    Ok(CudaMemory {
        allocated: out[0],
        reserved: out[1],
        peak_allocated: out[2],
        peak_reserved: out[3],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn a_fused_step_moves_parameters_and_moments_and_errors_are_messages() {
        let p = Tensor::ones([8], (Kind::Float, Device::Cpu));
        let g = Tensor::full([8], 0.5, (Kind::Float, Device::Cpu));
        let (m, v) = (p.zeros_like(), p.zeros_like());
        let s = Tensor::ones([], (Kind::Float, Device::Cpu));
        let h = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            eps: 1e-8,
        };
        fused_adamw(
            &[p.shallow_clone()],
            &[g.shallow_clone()],
            &[m.shallow_clone()],
            &[v.shallow_clone()],
            &[s.shallow_clone()],
            h,
        )
        .unwrap();
        // Step 1 of Adam moves every parameter by lr (m/sqrt(v) = 1 after bias correction).
        assert!(p.allclose(
            &Tensor::full([8], 0.9, (Kind::Float, Device::Cpu)),
            1e-6,
            1e-6,
            false
        ));
        assert!(m.allclose(&(&g * 0.1), 1e-6, 1e-7, false));
        // A dtype mismatch is torch's error, returned as a message.
        let half = Tensor::ones([8], (Kind::Half, Device::Cpu));
        let e = fused_adamw(&[p], &[half], &[m], &[v], &[s], h).unwrap_err();
        assert!(!e.is_empty());
    }

    #[test]
    fn allocator_figures_need_a_cuda_device() {
        if !tch::Cuda::is_available() {
            assert!(cuda_memory(0, false).is_err());
            // The shim itself reports torch's error instead of failing the process.
            let e = device_memory(0, false).unwrap_err();
            assert!(!e.is_empty());
        }
    }
}
