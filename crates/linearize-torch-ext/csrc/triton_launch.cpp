// The registry of ahead-of-time compiled Triton kernels (filled from Rust, which embeds the
// cubins) and their launches through the CUDA driver API, loaded with dlopen: libtorch links only
// the CUDA runtime, and a build machine without a driver still links this file.
#include "triton_launch.h"

#include <cstdio>
#include <exception>

#ifdef LINEARIZE_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>

#include <map>
#include <mutex>

namespace linearize {
namespace {

struct Image {
  std::string symbol;
  std::vector<unsigned char> cubin;
  int shared_bytes;
  int warps;
  int params;
};

struct Driver {
  decltype(&cuDeviceGet) device_get;
  decltype(&cuDeviceGetAttribute) device_get_attribute;
  decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain;
  decltype(&cuCtxSetCurrent) ctx_set_current;
  decltype(&cuModuleLoadData) module_load_data;
  decltype(&cuModuleGetFunction) module_get_function;
  decltype(&cuFuncSetAttribute) func_set_attribute;
  decltype(&cuLaunchKernel) launch_kernel;
  decltype(&cuGetErrorString) error_string;
};

template <typename F>
void load_symbol(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  TORCH_CHECK(*out != nullptr, "libcuda.so.1 has no ", name);
}

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "cannot load the CUDA driver (libcuda.so.1): ", dlerror());
    Driver d{};
    load_symbol(lib, "cuDeviceGet", &d.device_get);
    load_symbol(lib, "cuDeviceGetAttribute", &d.device_get_attribute);
    load_symbol(lib, "cuDevicePrimaryCtxRetain", &d.primary_ctx_retain);
    load_symbol(lib, "cuCtxSetCurrent", &d.ctx_set_current);
    load_symbol(lib, "cuModuleLoadData", &d.module_load_data);
    load_symbol(lib, "cuModuleGetFunction", &d.module_get_function);
    load_symbol(lib, "cuFuncSetAttribute", &d.func_set_attribute);
    load_symbol(lib, "cuLaunchKernel", &d.launch_kernel);
    load_symbol(lib, "cuGetErrorString", &d.error_string);
    return d;
  }();
  return d;
}

void check(CUresult result, const char* what, const std::string& key) {
  if (result == CUDA_SUCCESS) return;
  const char* message = nullptr;
  driver().error_string(result, &message);
  TORCH_CHECK(false, what, " (Triton kernel ", key, "): ", message ? message : "unknown error");
}

// What decides which compiled form a device runs, and whether it fits.
struct DeviceInfo {
  // "sm90/" on Hopper, "sm80/" on Ampere and Ada (sm_80 cubins run on sm_86 and sm_89), empty
  // where nothing was compiled.
  std::string arch;
  int max_shared_bytes;
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, Image> images;
  std::map<int, DeviceInfo> devices;
  // Per device: its primary context (the one the CUDA runtime, and so libtorch, uses) and the
  // functions loaded into it.
  std::map<int, CUcontext> contexts;
  std::map<std::pair<int, std::string>, CUfunction> functions;
};

Registry& registry() {
  static Registry r;
  return r;
}

// The device's DeviceInfo; the caller holds the registry's lock.
const DeviceInfo& device_info(Registry& r, int index) {
  auto found = r.devices.find(index);
  if (found != r.devices.end()) return found->second;
  const Driver& d = driver();
  CUdevice dev;
  check(d.device_get(&dev, index), "cuDeviceGet", "device query");
  int major = 0, shared = 0;
  check(d.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute", "device query");
  check(d.device_get_attribute(&shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                               dev),
        "cuDeviceGetAttribute", "device query");
  std::string arch = major == 9 ? "sm90/" : major == 8 ? "sm80/" : "";
  return r.devices.emplace(index, DeviceInfo{arch, shared}).first->second;
}

// The registered image that runs `key` on device `index`, or null.
const Image* image_for(Registry& r, const std::string& key, int index) {
  const DeviceInfo& info = device_info(r, index);
  if (info.arch.empty()) return nullptr;
  auto found = r.images.find(info.arch + key);
  if (found == r.images.end() || found->second.shared_bytes > info.max_shared_bytes) {
    return nullptr;
  }
  return &found->second;
}

}  // namespace

bool has_kernel(const std::string& key, int device) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return image_for(r, key, device) != nullptr;
}

void launch(const std::string& key, const at::Device& device, int64_t grid_x, int64_t grid_y,
            std::vector<KernelArg> args) {
  TORCH_CHECK(device.is_cuda(), "Triton kernel ", key, " needs a CUDA device, not ", device);
  const Driver& d = driver();
  int index = device.index() < 0 ? c10::cuda::current_device() : device.index();
  auto& r = registry();
  CUfunction function;
  const Image* image;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    image = image_for(r, key, index);
    TORCH_CHECK(image != nullptr, "no Triton kernel ", key, " was compiled for CUDA device ", index);
    auto ctx = r.contexts.find(index);
    if (ctx == r.contexts.end()) {
      CUdevice dev;
      check(d.device_get(&dev, index), "cuDeviceGet", key);
      CUcontext primary;
      check(d.primary_ctx_retain(&primary, dev), "cuDevicePrimaryCtxRetain", key);
      ctx = r.contexts.emplace(index, primary).first;
    }
    // Autograd runs backward passes on its own threads: make the device's context current here.
    check(d.ctx_set_current(ctx->second), "cuCtxSetCurrent", key);
    auto slot = r.functions.find({index, key});
    if (slot == r.functions.end()) {
      CUmodule module;
      check(d.module_load_data(&module, image->cubin.data()), "cuModuleLoadData", key);
      CUfunction f;
      check(d.module_get_function(&f, module, image->symbol.c_str()), "cuModuleGetFunction", key);
      if (image->shared_bytes > 48 * 1024) {
        check(d.func_set_attribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                   image->shared_bytes),
              "cuFuncSetAttribute", key);
      }
      slot = r.functions.emplace(std::make_pair(index, key), f).first;
    }
    function = slot->second;
  }
  // Triton appends two scratch pointers (global and profile scratch), unused by these kernels.
  TORCH_CHECK(static_cast<int>(args.size()) + 2 == image->params, "Triton kernel ", key, " takes ",
              image->params - 2, " arguments, given ", args.size());
  KernelArg none = KernelArg::i32(0);
  none.value.ptr = 0;
  args.push_back(none);
  args.push_back(none);
  std::vector<void*> params;
  for (auto& a : args) params.push_back(&a.value);
  auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(index)).stream();
  check(d.launch_kernel(function, static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), 1,
                        32 * image->warps, 1, 1, image->shared_bytes,
                        reinterpret_cast<CUstream>(stream), params.data(), nullptr),
        "cuLaunchKernel", key);
}

}  // namespace linearize
#endif

extern "C" {

// Whether kernel `key` was compiled for CUDA device `device` and fits its shared memory.
int linearize_triton_available(const char* key, int device, char* err, size_t err_len) {
#ifdef LINEARIZE_CUDA
  try {
    return linearize::has_kernel(key, device) ? 1 : 0;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "%s", e.what());
    return -1;
  }
#else
  (void)key, (void)device, (void)err, (void)err_len;
  return 0;
#endif
}

// Adds a compiled kernel to the registry (the image is copied). Without CUDA support there is
// nothing to launch it with, and the call does nothing.
int linearize_triton_register(const char* key, const char* symbol, const unsigned char* cubin,
                              size_t cubin_len, int shared_bytes, int warps, int params) {
#ifdef LINEARIZE_CUDA
  auto& r = linearize::registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.images[key] = linearize::Image{symbol, std::vector<unsigned char>(cubin, cubin + cubin_len),
                                   shared_bytes, warps, params};
  return 1;
#else
  (void)key, (void)symbol, (void)cubin, (void)cubin_len, (void)shared_bytes, (void)warps,
      (void)params;
  return 0;
#endif
}
}
