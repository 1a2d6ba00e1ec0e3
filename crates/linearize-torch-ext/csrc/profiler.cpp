// C entry points over libtorch's Kineto profiler and its RecordFunction ranges, which tch does
// not bind. Errors come back as a message in `err` and a non-zero return.
#include "ffi_error.h"
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <exception>
#include <set>
#include <string>

namespace {
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

// RecordFunction keeps a view of its name, not a copy: the range owns the string.
struct Range {
  explicit Range(const char* n) : name(n), record(at::RecordScope::USER_SCOPE) {
    if (record.isActive()) {
      record.before(std::string_view(name));
    }
  }
  std::string name;
  at::RecordFunction record;
};

std::set<ActivityType> activities(int cuda) {
  std::set<ActivityType> acts{ActivityType::CPU};
  if (cuda != 0) {
    acts.insert(ActivityType::CUDA);
  }
  return acts;
}
}  // namespace

using linearize::set_error;

extern "C" {

int linearize_profiler_start(int cuda, int memory, char* err, size_t err_len) {
  try {
    // With `memory`, every allocation and free (CPU and CUDA) is recorded as a "[memory]" event
    // with its size in bytes.
    ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/false,
                          /*profile_memory=*/memory != 0);
    auto acts = activities(cuda);
    torch::autograd::profiler::prepareProfiler(config, acts);
    torch::autograd::profiler::enableProfiler(config, acts);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
}

int linearize_profiler_stop(const char* trace_path, char* err, size_t err_len) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) {
      set_error(err, err_len, "the profiler returned no result");
      return 1;
    }
    result->save(std::string(trace_path));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
}

void* linearize_range_push(const char* name) {
  try {
    return new Range(name);
  } catch (...) {
    return nullptr;
  }
}

void linearize_range_pop(void* range) {
  try {
    delete static_cast<Range*>(range);
  } catch (...) {
  }
}

}  // extern "C"
