// The selective scan as a libtorch autograd Function.
//
// Why C++: tch exposes no way to define a custom autograd node, so the op's
// forward/backward pair lives here as a torch::autograd::Function. It prepares
// contiguous tensors, fills the C ABI params (kernels/selective_scan.h) and
// runs either the CUDA kernels on libtorch's current stream or the Rust CPU
// implementation, registered through dim_scan_set_cpu_impl. Rust calls the
// extern "C" functions at the bottom with tch's tensor handles (at::Tensor*).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <torch/csrc/autograd/autograd.h>

#ifdef DIM_WITH_CUDA
#include <cuda_runtime.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "dim_shim.h"
#include "selective_scan.h"

extern "C" {
typedef int (*dim_scan_cpu_fn)(const dim_scan_params*);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

dim_scan_cpu_fn g_cpu_fwd = nullptr;
dim_scan_cpu_fn g_cpu_bwd = nullptr;

// Inputs come as one flat list: per direction (u, delta, A, B, C, D,
// delta_bias), then z. Absent optional tensors are undefined.
constexpr int kPerDir = 7;
enum { kU = 0, kDelta, kA, kB, kC, kD, kBias };

// Flags packed in one integer so the Function has a single non-tensor
// argument. Bits 8.. say which of the inputs are present: autograd's Function
// only takes defined tensors, so absent ones are left out of its input list.
struct Flags {
  int ndirs;
  bool reverse, softplus, deterministic, save;
  int64_t present;
  static Flags decode(int64_t f) {
    return {static_cast<int>(f & 3), (f & 4) != 0, (f & 8) != 0, (f & 16) != 0, (f & 32) != 0,
            f >> 8};
  }
  size_t slots() const { return static_cast<size_t>(ndirs) * kPerDir + 1; }
  bool has(size_t slot) const { return (present >> slot) & 1; }
};

// The full input list (undefined where absent) from the present tensors.
std::vector<at::Tensor> expand(at::TensorList compact, const Flags& f) {
  std::vector<at::Tensor> full(f.slots());
  size_t j = 0;
  for (size_t i = 0; i < full.size(); ++i)
    if (f.has(i)) full[i] = compact[j++];
  TORCH_CHECK(j == compact.size(), "selective scan: input list does not match its mask");
  return full;
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DIM_DTYPE_F32;
    case at::kBFloat16: return DIM_DTYPE_BF16;
    case at::kHalf: return DIM_DTYPE_F16;
    default: TORCH_CHECK(false, "selective scan: unsupported dtype ", t);
  }
}

bool is_param(int slot) { return slot == kA || slot == kD || slot == kBias; }

// Whether a CUDA tensor is packed in every dimension but the first: the
// kernels take such views (narrowed out of a larger projection output, say)
// with their batch stride, without a copy.
bool packed_but_batch(const at::Tensor& t) {
  if (!t.is_cuda() || t.dim() < 2) return false;
  int64_t expect = 1;
  for (int64_t i = t.dim() - 1; i >= 1; --i) {
    if (t.size(i) != 1 && t.stride(i) != expect) return false;
    expect *= t.size(i);
  }
  return t.stride(0) >= expect || t.size(0) == 1;
}

// Contiguous copies where needed (CUDA data tensors may keep a batch stride);
// A, D and delta_bias in f32.
std::vector<at::Tensor> prepare(at::TensorList in) {
  std::vector<at::Tensor> out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i].defined()) {
      out.emplace_back();
      continue;
    }
    bool param = i + 1 < in.size() && is_param(static_cast<int>(i % kPerDir));
    at::Tensor t = in[i].detach();
    if (param) t = t.to(at::kFloat);
    out.push_back(!param && packed_but_batch(t) ? t : t.contiguous());
  }
  return out;
}

// The batch stride to hand the kernels: 0 (packed) unless a CUDA view keeps one.
int64_t batch_stride(const at::Tensor& t) {
  if (!t.defined() || !t.is_cuda() || t.is_contiguous() || t.size(0) == 1) return 0;
  return t.stride(0);
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

dim_scan_params make_params(const std::vector<at::Tensor>& in, Flags f) {
  dim_scan_params p;
  std::memset(&p, 0, sizeof(p));
  const at::Tensor& u = in[kU];
  const at::Tensor& B = in[kB];
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.seqlen = u.size(2);
  p.dstate = in[kA].size(1);
  p.ngroups = B.size(1);
  p.ndirs = f.ndirs;
  p.dtype = dtype_code(u.scalar_type());
  p.delta_softplus = f.softplus;
  p.deterministic = f.deterministic;
  for (int k = 0; k < f.ndirs; ++k) {
    const at::Tensor* t = &in[k * kPerDir];
    dim_scan_dir& d = p.dir[k];
    d.u = ptr<void>(t[kU]);
    d.delta = ptr<void>(t[kDelta]);
    d.A = ptr<float>(t[kA]);
    d.B = ptr<void>(t[kB]);
    d.C = ptr<void>(t[kC]);
    d.D = ptr<float>(t[kD]);
    d.delta_bias = ptr<float>(t[kBias]);
    d.reverse = f.ndirs == 2 ? k : f.reverse;
    p.u_batch_stride[k] = batch_stride(t[kU]);
    p.delta_batch_stride[k] = batch_stride(t[kDelta]);
    p.B_batch_stride[k] = batch_stride(t[kB]);
    p.C_batch_stride[k] = batch_stride(t[kC]);
  }
  p.z = ptr<void>(in[f.ndirs * kPerDir]);
  p.z_batch_stride = batch_stride(in[f.ndirs * kPerDir]);
  return p;
}

at::Tensor bytes_on(const at::Tensor& like, size_t n) {
  return at::empty({static_cast<int64_t>(n)}, like.options().dtype(at::kByte));
}

// Runs the forward or backward on the tensors' device.
void run(dim_scan_params& p, const at::Tensor& u, bool backward, const at::Tensor& saved) {
  if (u.is_cuda()) {
#ifdef DIM_WITH_CUDA
    c10::cuda::CUDAGuard guard(u.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    size_t ws_bytes = backward ? dim_scan_cuda_bwd_workspace_bytes(&p)
                               : dim_scan_cuda_fwd_workspace_bytes(&p);
    at::Tensor ws = bytes_on(u, ws_bytes);
    p.workspace = ws_bytes ? ws.data_ptr() : nullptr;
    p.saved = saved.defined() && saved.numel() ? saved.data_ptr() : nullptr;
    int rc = backward ? dim_scan_cuda_bwd(&p, stream) : dim_scan_cuda_fwd(&p, stream);
    TORCH_CHECK(rc == 0, "selective scan CUDA ", backward ? "backward" : "forward",
                " failed: ", dim_scan_cuda_error_string(rc));
#else
    TORCH_CHECK(false, "selective scan: this build has no CUDA kernels");
#endif
  } else {
    TORCH_CHECK(u.is_cpu(), "selective scan: unsupported device ", u.device());
    dim_scan_cpu_fn fn = backward ? g_cpu_bwd : g_cpu_fwd;
    TORCH_CHECK(fn != nullptr, "selective scan: CPU implementation not registered");
    TORCH_CHECK(fn(&p) == 0, "selective scan: CPU ", backward ? "backward" : "forward",
                " failed (see the log)");
  }
}

class SelectiveScanFn : public torch::autograd::Function<SelectiveScanFn> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList compact, int64_t flags) {
    Flags f = Flags::decode(flags);
    std::vector<at::Tensor> inputs = expand(compact, f);
    std::vector<at::Tensor> in = prepare(inputs);
    const at::Tensor& u = in[kU];
    at::Tensor y = at::empty_like(u, at::MemoryFormat::Contiguous);
    dim_scan_params p = make_params(in, f);
    p.y = y.data_ptr();
    at::Tensor saved;
#ifdef DIM_WITH_CUDA
    // Only a forward whose backward can run keeps anything (no_grad sampling
    // writes no chunk states and no ungated y).
    if (u.is_cuda() && f.save) {
      c10::cuda::CUDAGuard guard(u.device());
      saved = bytes_on(u, dim_scan_cuda_saved_bytes(&p));
    }
#endif
    run(p, u, false, saved);
    // Keep the original dtypes of the parameters so their gradients match.
    std::vector<int64_t> kinds;
    for (const auto& t : inputs)
      kinds.push_back(t.defined() ? static_cast<int64_t>(t.scalar_type()) : -1);
    in.push_back(saved);
    ctx->save_for_backward(in);
    ctx->saved_data["flags"] = flags;
    ctx->saved_data["kinds"] = kinds;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    Flags f = Flags::decode(ctx->saved_data["flags"].toInt());
    std::vector<int64_t> kinds = ctx->saved_data["kinds"].toIntVector();
    variable_list in = ctx->get_saved_variables();
    at::Tensor saved = in.back();
    in.pop_back();
    TORCH_CHECK(!in[kU].is_cuda() || (saved.defined() && saved.numel() > 0),
                "selective scan: backward of a forward that saved nothing (it ran without grad)");
    const at::Tensor& u = in[kU];
    dim_scan_params p = make_params(in, f);
    at::Tensor dy = grad_out[0].defined() ? grad_out[0].to(u.scalar_type()).contiguous()
                                          : at::zeros_like(u);
    p.dy = dy.data_ptr();

    std::vector<at::Tensor> grads(in.size());
    auto f32 = u.options().dtype(at::kFloat);
    for (int k = 0; k < f.ndirs; ++k) {
      at::Tensor* g = &grads[k * kPerDir];
      const at::Tensor* t = &in[k * kPerDir];
      dim_scan_dir_grads& pg = p.grad[k];
      // Contiguous, as the kernels write them (inputs may be batch-strided views).
      // du, ddelta in the input dtype, the rest f32; none for an absent D or bias.
      for (int i = 0; i < kPerDir; ++i)
        if (t[i].defined())
          g[i] = at::empty(t[i].sizes(), i == kU || i == kDelta ? t[i].options() : f32);
      pg.du = ptr<void>(g[kU]);
      pg.ddelta = ptr<void>(g[kDelta]);
      pg.dA = ptr<float>(g[kA]);
      pg.dB = ptr<float>(g[kB]);
      pg.dC = ptr<float>(g[kC]);
      pg.dD = ptr<float>(g[kD]);
      pg.ddelta_bias = ptr<float>(g[kBias]);
    }
    const size_t zi = static_cast<size_t>(f.ndirs) * kPerDir;
    if (in[zi].defined()) {
      grads[zi] = at::empty(in[zi].sizes(), in[zi].options());
      p.dz = grads[zi].data_ptr();
    }
    run(p, u, true, saved);

    variable_list out;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!f.has(i)) continue;
      at::Tensor g = grads[i];
      if (g.defined() && kinds[i] >= 0 && g.scalar_type() != static_cast<at::ScalarType>(kinds[i]))
        g = g.to(static_cast<at::ScalarType>(kinds[i]));
      out.push_back(g);
    }
    out.emplace_back();  // flags
    return out;
  }
};

using dim_shim::guarded;

}  // namespace

extern "C" {

void dim_scan_set_cpu_impl(dim_scan_cpu_fn fwd, dim_scan_cpu_fn bwd) {
  g_cpu_fwd = fwd;
  g_cpu_bwd = bwd;
}

int dim_scan_cuda_built() {
#ifdef DIM_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// inputs: n tensors (at::Tensor* or NULL) in the order described above.
// On success *out is a new at::Tensor* holding y (owned by the caller).
int dim_scan_apply(void** inputs, int n, int64_t flags, void** out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    std::vector<at::Tensor> list;
    int64_t present = 0;
    bool wants_grad = false;
    for (int i = 0; i < n; ++i) {
      if (!inputs[i]) continue;
      list.push_back(*static_cast<at::Tensor*>(inputs[i]));
      present |= int64_t{1} << i;
      wants_grad = wants_grad || list.back().requires_grad();
    }
    // Bit 5: a backward may run, so the forward keeps what it needs.
    const int64_t save = at::GradMode::is_enabled() && wants_grad ? 32 : 0;
    variable_list y =
        SelectiveScanFn::apply(at::TensorList(list), flags | save | (present << 8));
    *out = new at::Tensor(y[0]);
  });
}

// out = alpha * x + iota, by the smoke kernel, on libtorch's current stream.
int dim_smoke_apply(void* out_t, void* x_t, float alpha, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    at::Tensor& out = *static_cast<at::Tensor*>(out_t);
    const at::Tensor& x = *static_cast<at::Tensor*>(x_t);
    TORCH_CHECK(x.is_cuda() && out.is_cuda(), "smoke: tensors must be on CUDA");
    TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
                "smoke: tensors must be f32");
    TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.numel() == out.numel(),
                "smoke: tensors must be contiguous and of equal size");
#ifdef DIM_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    int rc = dim_smoke_axpy_iota(ptr<float>(out), ptr<float>(x), alpha, x.numel(),
                                 c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(rc == 0, "smoke kernel launch failed with CUDA error ", rc);
#else
    TORCH_CHECK(false, "smoke: this build has no CUDA kernels");
#endif
  });
}

// Peak bytes allocated by libtorch's caching allocator on `device`.
int dim_cuda_peak_memory(int device, uint64_t* out, int reset, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
#ifdef DIM_WITH_CUDA
    auto dev = static_cast<c10::DeviceIndex>(device);
    if (reset) {
      c10::cuda::CUDACachingAllocator::resetPeakStats(dev);
      *out = 0;
    } else {
      auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev);
      *out = static_cast<uint64_t>(stats.allocated_bytes[0].peak);
    }
#else
    (void)device;
    (void)reset;
    *out = 0;
    TORCH_CHECK(false, "this build has no CUDA support");
#endif
  });
}

// TF32 tensor-core math for f32 matmuls and convolutions (PyTorch's
// torch.backends.{cuda.matmul,cudnn}.allow_tf32), which tch does not expose.
int dim_set_allow_tf32(int enable, int* now, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    at::globalContext().setAllowTF32CuBLAS(enable != 0);
    at::globalContext().setAllowTF32CuDNN(enable != 0);
    *now = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  });
}

// CUDA autocast state through libtorch's device-typed calls. tch's autocast
// uses at::autocast::{is,set}_enabled, which libtorch 2.11 deprecates with a
// warning on every call (thousands of lines in a training log), and tch has
// no setter for the autocast dtype. The state is thread-local in libtorch.
//   op 0, enter: *out = enabled before; set enabled = value; nesting + 1.
//   op 1, exit: nesting - 1, dropping the cast cache at 0; enabled = value.
//   op 2: set the dtype to ScalarType code value; *out = the code read back.
//   op 3: *out = the dtype's ScalarType code.   op 4: *out = enabled.
int dim_cuda_autocast(int op, int value, int* out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    constexpr auto cuda = at::DeviceType::CUDA;
    switch (op) {
      case 0:
        *out = at::autocast::is_autocast_enabled(cuda) ? 1 : 0;
        at::autocast::set_autocast_enabled(cuda, value != 0);
        at::autocast::increment_nesting();
        break;
      case 1:
        if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
        at::autocast::set_autocast_enabled(cuda, value != 0);
        break;
      case 2:
        at::autocast::set_autocast_dtype(cuda, static_cast<at::ScalarType>(value));
        *out = static_cast<int>(at::autocast::get_autocast_dtype(cuda));
        break;
      case 3:
        *out = static_cast<int>(at::autocast::get_autocast_dtype(cuda));
        break;
      case 4:
        *out = at::autocast::is_autocast_enabled(cuda) ? 1 : 0;
        break;
      default:
        TORCH_CHECK(false, "dim_cuda_autocast: unknown op ", op);
    }
  });
}

// torch::autograd::backward({y}, {dy}): tch has no call with output gradients.
int dim_backward_with_grad(void* y_t, void* dy_t, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    const at::Tensor& y = *static_cast<at::Tensor*>(y_t);
    const at::Tensor& dy = *static_cast<at::Tensor*>(dy_t);
    torch::autograd::backward({y}, {dy});
  });
}

// CUDA events on libtorch's current stream, for benchmarks. op: 0 create
// (*ev), 1 record ev, 2 elapsed ms from ev to ev2 (waits for ev2), 3 destroy.
int dim_cuda_event(int op, void** ev, void* ev2, float* ms, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
#ifdef DIM_WITH_CUDA
    cudaError_t rc = cudaSuccess;
    switch (op) {
      case 0: rc = cudaEventCreate(reinterpret_cast<cudaEvent_t*>(ev)); break;
      case 1:
        rc = cudaEventRecord(static_cast<cudaEvent_t>(*ev),
                             c10::cuda::getCurrentCUDAStream().stream());
        break;
      case 2:
        rc = cudaEventSynchronize(static_cast<cudaEvent_t>(ev2));
        if (rc == cudaSuccess)
          rc = cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(*ev),
                                    static_cast<cudaEvent_t>(ev2));
        break;
      case 3: rc = cudaEventDestroy(static_cast<cudaEvent_t>(*ev)); break;
      default: TORCH_CHECK(false, "bad event op");
    }
    TORCH_CHECK(rc == cudaSuccess, "CUDA event call failed: ", cudaGetErrorString(rc));
#else
    (void)op; (void)ev; (void)ev2; (void)ms;
    TORCH_CHECK(false, "this build has no CUDA support");
#endif
  });
}

// Special-function (MUFU ex2) rate probe: see kernels/smoke.cu.
int dim_probe_exp2(void* out_t, int iters, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
#ifdef DIM_WITH_CUDA
    at::Tensor& out = *static_cast<at::Tensor*>(out_t);
    TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kFloat && out.is_contiguous(),
                "probe: out must be a contiguous f32 CUDA tensor");
    c10::cuda::CUDAGuard guard(out.device());
    int rc = dim_probe_exp2_rate(ptr<float>(out), out.numel(), iters,
                                 c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(rc == 0, "probe launch failed with CUDA error ", rc);
#else
    (void)out_t; (void)iters;
    TORCH_CHECK(false, "this build has no CUDA support");
#endif
  });
}

}  // extern "C"
