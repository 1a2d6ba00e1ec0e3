// C entry points over libtorch's CUDA graphs (`at::cuda::CUDAGraph`), which tch does not bind.
// Built with LINEARIZE_CUDA only where libtorch has CUDA and the CUDA headers were found; without
// it every call reports that. Errors come back as a message in `err` and a non-zero return.
#include "ffi_error.h"

#ifdef LINEARIZE_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <exception>
#include <memory>

namespace {
#ifdef LINEARIZE_CUDA
// Makes `stream` (and its device) current until destroyed. c10's own guards inline CUDA runtime
// calls, which would need libcudart at link time; these functions live in libc10_cuda.
struct StreamScope {
  explicit StreamScope(c10::cuda::CUDAStream stream)
      : device(c10::cuda::current_device()),
        previous(c10::cuda::getCurrentCUDAStream(stream.device_index())) {
    c10::cuda::set_device(stream.device_index());
    c10::cuda::setCurrentCUDAStream(stream);
  }
  ~StreamScope() {
    c10::cuda::setCurrentCUDAStream(previous);
    c10::cuda::set_device(device);
  }
  c10::DeviceIndex device;
  c10::cuda::CUDAStream previous;
};
#else
const char* const kNoCuda =
    "CUDA graphs are unavailable: linearize was built against a libtorch without CUDA or "
    "without the CUDA headers";
#endif
}  // namespace

using linearize::set_error;

extern "C" {

typedef int (*linearize_graph_body)(void* ctx);

// Captures what `body(ctx)` launches on device `device` into a new graph (`*graph`). The body
// runs once on a side stream in capture mode: its kernels are recorded, not run. A non-zero
// return of the body ends the capture and returns 2 (the body keeps its own error).
int linearize_cuda_graph_capture(int device, linearize_graph_body body, void* ctx, void** graph,
                                 char* err, size_t err_len) {
#ifdef LINEARIZE_CUDA
  try {
    auto index = static_cast<c10::DeviceIndex>(device);
    if (index < 0 || index >= c10::cuda::device_count()) {
      set_error(err, err_len, "no such CUDA device");
      return 1;
    }
    auto stream = c10::cuda::getStreamFromPool(false, index);
    auto captured = std::make_unique<at::cuda::CUDAGraph>();
    {
      StreamScope scope(stream);
      // The side stream must not start before the work already queued on the current one.
      c10::cuda::device_synchronize();
      // The graph allocates from a private pool: blocks the caching allocator keeps free for
      // eager work would sit unused beside it, so they go back to the device first.
      c10::cuda::CUDACachingAllocator::emptyCache();
      // Thread-local mode: other threads (a memory probe, a logger) may keep calling CUDA.
      captured->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      if (body(ctx) != 0) {
        try {
          captured->capture_end();
        } catch (...) {
        }
        return 2;
      }
      captured->capture_end();
    }
    *graph = captured.release();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
#else
  (void)device;
  (void)body;
  (void)ctx;
  (void)graph;
  set_error(err, err_len, kNoCuda);
  return 1;
#endif
}

// Launches the captured work once on the current stream.
int linearize_cuda_graph_replay(void* graph, char* err, size_t err_len) {
#ifdef LINEARIZE_CUDA
  try {
    static_cast<at::cuda::CUDAGraph*>(graph)->replay();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
#else
  (void)graph;
  set_error(err, err_len, kNoCuda);
  return 1;
#endif
}

void linearize_cuda_graph_free(void* graph) {
#ifdef LINEARIZE_CUDA
  delete static_cast<at::cuda::CUDAGraph*>(graph);
#else
  (void)graph;
#endif
}
}
