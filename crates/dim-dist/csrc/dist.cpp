// dim-dist's bridge to c10d, the collective engine inside libtorch that
// PyTorch's DistributedDataParallel uses: a TCPStore rendezvous, a
// ProcessGroup backed by Gloo (CPU) or NCCL (CUDA, when compiled with
// DIM_WITH_NCCL), and c10d::Reducer, DDP's bucketing engine that all-reduces
// gradient buckets from autograd hooks while the backward still runs.
//
// Every extern "C" function returns 0, or 1 with the C++ exception's message
// in `err` (dim_shim.h), so the Rust side turns failures into typed errors.
// Tensors are tch's handles (at::Tensor*).
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef DIM_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "dim_shim.h"

namespace {

using c10d::ProcessGroup;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<ProcessGroup> pg;
  std::chrono::milliseconds timeout;
  bool cuda;
  bool shut_down = false;
};

// Adds a backend for `device` to `pg`, behind its own key prefix in
// `store`, and makes it the default: Gloo first, NCCL after it when CUDA is
// used (as torch.distributed's "gloo|nccl" groups do).
template <typename Backend>
void add_backend(ProcessGroup& pg, const c10::intrusive_ptr<c10d::Store>& store,
                 const char* prefix, int rank, int world,
                 c10::intrusive_ptr<typename Backend::Options> opts,
                 c10::DeviceType device, ProcessGroup::BackendType type) {
  opts->group_name = "0";
  auto backend = c10::make_intrusive<Backend>(
      c10::make_intrusive<c10d::PrefixStore>(prefix, store), rank, world,
      opts);
  backend->setSequenceNumberForGroup();
  pg.setBackend(device, type, backend);
  pg.setDefaultBackend(type);
}

std::vector<at::Tensor> gather(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

// A communication hook that sends each gradient bucket in a narrower float
// type (f16 or bf16: half the bytes of f32) and writes the average back into
// the f32 bucket. The bucket is divided by the world size before the sum, so
// f16 cannot overflow where f32 would not; bf16 keeps f32's range but 8 bits
// of mantissa. With a hook the Reducer leaves the averaging to it.
class CompressHook : public c10d::CommHookInterface {
 public:
  CompressHook(c10::intrusive_ptr<ProcessGroup> pg, at::ScalarType wire)
      : pg_(std::move(pg)), wire_(wire) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(
      c10d::GradBucket& bucket) override {
    at::Tensor buffer = bucket.getBufferRef();
    std::vector<at::Tensor> packed{buffer.to(wire_).div_(pg_->getSize())};
    auto sent = pg_->allreduce(packed)->getFuture();
    return sent->then(
        [buffer](c10::ivalue::Future& done) {
          buffer.copy_(done.value().toTensorVector()[0]);
          return c10::IValue(buffer);
        },
        c10::TensorType::get());
  }

  at::Tensor parseHookResult(const c10::IValue& result) override {
    return result.toTensor();
  }

 private:
  c10::intrusive_ptr<ProcessGroup> pg_;
  at::ScalarType wire_;
};

}  // namespace

extern "C" {

// Connects to the rendezvous at host:port (rank 0 hosts the TCPStore there)
// and builds the process group: Gloo for CPU tensors, NCCL for CUDA tensors
// when `cuda` >= 0 (the CUDA device index this rank uses, made current so
// that NCCL and libtorch's streams live there). `timeout_ms` bounds the
// rendezvous and every collective.
int dim_dist_group_new(const char* host, int port, int rank, int world,
                       int cuda, int64_t timeout_ms, void** out, char* err,
                       size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    // Under torchrun (torch.distributed.elastic) the agent already hosts the
    // store on MASTER_PORT: every rank, rank 0 too, is then a client, and
    // keys are kept apart per restart.
    const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
    bool agent_store = agent != nullptr && std::string(agent) == "True";
    const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
    c10d::TCPStoreOptions sopts;
    sopts.port = static_cast<uint16_t>(port);
    sopts.isServer = rank == 0 && !agent_store;
    sopts.numWorkers = static_cast<size_t>(world);
    sopts.waitWorkers = !agent_store;
    sopts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), sopts);
    // One prefix per group, as torch.distributed does ("default_pg").
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(
        std::string("dim/") + (restart ? restart : "0"), tcp);
    auto pg = c10::make_intrusive<ProcessGroup>(store, rank, world);

    // Honours GLOO_SOCKET_IFNAME (the network interface, multi-node), else
    // the interface of this host's name, as torch.distributed does.
    add_backend<c10d::ProcessGroupGloo>(
        *pg, store, "gloo", rank, world,
        c10d::ProcessGroupGloo::Options::create_default(timeout),
        c10::DeviceType::CPU, ProcessGroup::BackendType::GLOO);
    if (cuda >= 0) {
#ifdef DIM_WITH_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda));
      auto nopts = c10d::ProcessGroupNCCL::Options::create();
      nopts->timeout = timeout;
      add_backend<c10d::ProcessGroupNCCL>(*pg, store, "nccl", rank, world,
                                          nopts, c10::DeviceType::CUDA,
                                          ProcessGroup::BackendType::NCCL);
#else
      TORCH_CHECK(false,
                  "this build of dim has no NCCL (built without CUDA headers): "
                  "rebuild with the CUDA toolkit, or train on CPU");
#endif
    }
    pg->setGroupName("0");
    *out = new Group{tcp, pg, timeout, cuda >= 0, false};
  });
}

// Ends the group cleanly (after a final barrier): NCCL communicators are
// finalised instead of torn down by the destructor with a warning.
int dim_dist_group_shutdown(void* g, char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    group->pg->shutdown();
    group->shut_down = true;
  });
}

// Frees the group; one not shut down (a failure path, a peer may be dead) is
// aborted first, so that no communicator waits for the dead peer.
void dim_dist_group_free(void* g) {
  auto* group = static_cast<Group*>(g);
  if (!group->shut_down) {
    try {
      group->pg->abort();
    } catch (...) {
    }
  }
  delete group;
}

// A second client connection to the same TCPStore, for a heartbeat thread
// (one store client must not be shared between threads mid-request).
int dim_dist_store_clone(void* g, void** out, char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    *out = new c10::intrusive_ptr<c10d::Store>(group->store->clone());
  });
}

void dim_dist_store_free(void* s) {
  delete static_cast<c10::intrusive_ptr<c10d::Store>*>(s);
}

// store[key] += delta; returns the new value in *value.
int dim_dist_store_add(void* s, const char* key, int64_t delta, int64_t* value,
                       char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto& store = *static_cast<c10::intrusive_ptr<c10d::Store>*>(s);
    *value = store->add(std::string("dim/hb/") + key, delta);
  });
}

// Broadcasts `n` tensors from `root` in place, one flat buffer per kind and
// device (as DDP's _broadcast_coalesced), waiting for the result.
int dim_dist_broadcast(void* g, at::Tensor** ts, size_t n, int root,
                       char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    auto tensors = gather(ts, n);
    std::unordered_map<int, std::vector<size_t>> by_kind;
    for (size_t i = 0; i < n; ++i)
      by_kind[static_cast<int>(tensors[i].scalar_type())].push_back(i);
    for (auto& [kind, idx] : by_kind) {
      std::vector<at::Tensor> flat_parts;
      for (auto i : idx) flat_parts.push_back(tensors[i].detach().reshape(-1));
      std::vector<at::Tensor> buf{at::cat(flat_parts)};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      group->pg->broadcast(buf, opts)->wait(group->timeout);
      int64_t off = 0;
      at::NoGradGuard no_grad;
      for (auto i : idx) {
        auto numel = tensors[i].numel();
        tensors[i].detach().copy_(
            buf[0].narrow(0, off, numel).view(tensors[i].sizes()));
        off += numel;
      }
    }
  });
}

// All-reduces `n` tensors in place (op 0: sum, 1: average), waiting for it.
int dim_dist_allreduce(void* g, at::Tensor** ts, size_t n, int op, char* err,
                       size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    auto tensors = gather(ts, n);
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      group->pg->allreduce(one, opts)->wait(group->timeout);
      if (op == 1) {
        at::NoGradGuard no_grad;
        t.div_(group->pg->getSize());
      }
    }
  });
}

int dim_dist_barrier(void* g, char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    group->pg->barrier(opts)->wait(group->timeout);
  });
}

// A c10d::Reducer over `params` (leaf tensors requiring grad, in the order
// the model creates them). Buckets hold about `bucket_bytes` each, the first
// `first_bucket_bytes` (small, so the first all-reduce starts early), in
// reverse parameter order: the backward produces the last layers' gradients
// first. Gradients are averaged over the ranks.
//
// `bucket_view` (DDP's gradient_as_bucket_view): after the first step each
// `.grad` is a view into its bucket, which saves one copy of every gradient
// per step and the memory of a second set. `compress`: 0 sends f32, 1 f16,
// 2 bf16 (CompressHook).
int dim_dist_reducer_new(void* g, at::Tensor** ps, size_t n,
                         const char* const* names, int64_t bucket_bytes,
                         int64_t first_bucket_bytes, int bucket_view,
                         int compress, void** out, char* err, size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* group = static_cast<Group*>(g);
    auto params = gather(ps, n);
    c10d::verify_params_across_processes(group->pg, params, std::nullopt);
    std::vector<int64_t> reversed(n);
    for (size_t i = 0; i < n; ++i) reversed[i] = static_cast<int64_t>(n - 1 - i);
    std::vector<size_t> limits{static_cast<size_t>(first_bucket_bytes),
                               static_cast<size_t>(bucket_bytes)};
    auto [buckets, per_bucket_limits] = c10d::compute_bucket_assignment_by_size(
        params, limits, std::vector<bool>(n, false), reversed);
    (void)per_bucket_limits;
    std::unordered_map<size_t, std::string> param_names;
    for (size_t i = 0; i < n; ++i) param_names[i] = names[i];
    auto* reducer = new c10d::Reducer(
        params, std::move(buckets), group->pg, std::vector<bool>(n, false),
        bucket_bytes,
        /*find_unused_parameters=*/false,
        /*gradient_as_bucket_view=*/bucket_view != 0, std::move(param_names),
        first_bucket_bytes,
        /*skip_all_reduce_unused_params=*/false,
        /*use_python_reducer=*/false, std::vector<int64_t>{});
    if (compress != 0) {
      TORCH_CHECK(compress == 1 || compress == 2, "unknown compression ",
                  compress);
      reducer->register_comm_hook(std::make_unique<CompressHook>(
          group->pg, compress == 1 ? at::kHalf : at::kBFloat16));
    }
    *out = reducer;
  });
}

void dim_dist_reducer_free(void* r) { delete static_cast<c10d::Reducer*>(r); }

// Arms the reducer for the next backward (the last micro-batch of a step):
// its gradient hooks then launch each bucket's all-reduce as soon as the
// bucket is full, and the end of the backward waits for them and writes the
// averaged gradients into `.grad`. Without this call the hooks do nothing and
// gradients accumulate locally (gradient accumulation).
int dim_dist_reducer_prepare(void* r, at::Tensor* output, char* err,
                             size_t len) {
  return dim_shim::guarded(err, len, [&] {
    auto* reducer = static_cast<c10d::Reducer*>(r);
    // DDP re-orders the buckets once, after the first step, by the order the
    // gradients actually arrived in (rank 0's order, broadcast).
    reducer->rebuild_buckets();
    reducer->prepare_for_forward();
    reducer->prepare_for_backward({*output});
  });
}

// 1 when this build can drive NCCL.
int dim_dist_has_nccl() {
#ifdef DIM_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
