// rlrun's shim over libtorch for what tch does not expose. Every function catches C++ exceptions
// and returns them as a malloc'd message (NULL on success) that Rust frees with rlrun_ext_free.
// Tensors arrive as tch's handles, which are `at::Tensor*`.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" {

char* rlrun_ext_error(const char* what) {
  char* m = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (m) std::strcpy(m, what);
  return m;
}

void rlrun_ext_free(char* p) { std::free(p); }

static std::vector<at::Tensor> list(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}

// One fused AdamW step (torch.optim.AdamW(fused=True), non-amsgrad) over `n` tensors of each
// list; `steps` holds each tensor's step count (already incremented, as torch does before).
char* rlrun_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                        at::Tensor** exp_avg_sqs, at::Tensor** steps, size_t n, double lr,
                        double beta1, double beta2, double weight_decay, double eps) {
  try {
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n),
         s = list(steps, n);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false);
    return nullptr;
  } catch (const std::exception& e) {
    return rlrun_ext_error(e.what());
  }
}

// The device allocator's allocated and reserved bytes and their peaks (all pools) on accelerator
// device `device` (CUDA here); `reset` restarts the peaks. Without an accelerator: an error.
char* rlrun_device_memory(int device, int reset, int64_t* out) {
  try {
    const auto d = static_cast<c10::DeviceIndex>(device);
    auto s = at::accelerator::getDeviceStats(d);
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[all].current;
    out[1] = s.reserved_bytes[all].current;
    out[2] = s.allocated_bytes[all].peak;
    out[3] = s.reserved_bytes[all].peak;
    if (reset) at::accelerator::resetPeakStats(d);
    return nullptr;
  } catch (const std::exception& e) {
    return rlrun_ext_error(e.what());
  }
}

}  // extern "C"
