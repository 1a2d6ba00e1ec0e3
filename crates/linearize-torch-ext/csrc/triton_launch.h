// Launches of the ahead-of-time compiled Triton kernels (triton/compile.py) through the CUDA
// driver API, which is loaded at run time (libcuda.so.1 comes with the driver, not the toolkit).
#pragma once
#ifdef LINEARIZE_CUDA
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace linearize {

// One kernel argument as the compiled kernel reads it.
struct KernelArg {
  static KernelArg ptr(const at::Tensor& t) {
    KernelArg a;
    a.value.ptr = reinterpret_cast<uint64_t>(t.data_ptr());
    return a;
  }
  static KernelArg i32(int64_t v) {
    KernelArg a;
    a.value.i32 = static_cast<int32_t>(v);
    return a;
  }
  static KernelArg f32(double v) {
    KernelArg a;
    a.value.f32 = static_cast<float>(v);
    return a;
  }
  union {
    uint64_t ptr;
    int32_t i32;
    float f32;
  } value;
};

// Whether kernel `key` (without its architecture) was compiled for CUDA device `device` and fits
// its shared memory.
bool has_kernel(const std::string& key, int device);

// Runs the form of kernel `key` compiled for `device`'s architecture on a grid of (x, y) programs on the current stream of `device`; throws with
// the driver's message on failure.
void launch(const std::string& key, const at::Device& device, int64_t grid_x, int64_t grid_y,
            std::vector<KernelArg> args);

}  // namespace linearize
#endif
