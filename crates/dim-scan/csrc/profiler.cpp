// libtorch's Kineto profiler (what torch.profiler drives from Python),
// reachable from Rust: record a window of work (the host's operators and,
// through CUPTI, every CUDA kernel, copy and NCCL collective on every
// stream), then write it as a Chrome trace (chrome://tracing, Perfetto).
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>
#include <string>

#include "dim_shim.h"

namespace {

using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

std::set<ActivityType> activities(int host, int cuda) {
  std::set<ActivityType> a;
  if (host != 0) a.insert(ActivityType::CPU);
  if (cuda != 0) a.insert(ActivityType::CUDA);
  TORCH_CHECK(!a.empty(), "nothing to profile: neither host nor CUDA");
  return a;
}

ProfilerConfig config() {
  return ProfilerConfig(ProfilerState::KINETO, /*report_input_shapes=*/true);
}

}  // namespace

extern "C" {

// Starts recording on this thread (and the autograd threads it starts):
// the host's operators (`host`; they slow the host down) and/or the GPU's
// kernels, copies and collectives (`cuda`, through CUPTI).
int dim_profiler_start(int host, int cuda, char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto a = activities(host, cuda);
    torch::autograd::profiler::prepareProfiler(config(), a);
    torch::autograd::profiler::enableProfiler(config(), a);
  });
}

// Stops recording and writes the trace to `path`.
int dim_profiler_stop(const char* path, char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    TORCH_CHECK(result != nullptr, "the profiler was not running");
    result->save(path);
  });
}

}  // extern "C"
