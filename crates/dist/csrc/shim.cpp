// The C boundary of `dist`: c10d's TCPStore rendezvous and Gloo process group, and the
// collectives of any group (Gloo, or NCCL from `nccl.cpp`), behind a handful of extern "C"
// functions over `at::Tensor*` (tch's C_tensor). Every C++ exception becomes a malloc'd message
// returned to Rust (freed by `nibble_dist_free_error`); none crosses the FFI.
//
// ProcessGroupGloo.hpp names gloo types the wheel ships no headers for; `gloo_decl/` declares
// the few it needs. The class layout does not depend on them (gloo objects are held through smart
// pointers only); the sizes below are the ones libtorch_cpu.so itself allocates (`operator new`
// before the constructor in ProcessGroupGloo::split and Options::create_default, torch 2.11.0).

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "ffi.h"

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8, "ProcessGroupGloo layout differs from libtorch 2.11.0's");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 0xb0, "ProcessGroupGloo::Options layout differs from libtorch 2.11.0's");

using nibble_dist::guarded;

namespace {

// Wait for a collective; a timeout or a peer's failure surfaces as an exception.
void finish(const c10::intrusive_ptr<c10d::Work>& work, int64_t timeout_ms) {
  if (!work->wait(std::chrono::milliseconds(timeout_ms))) {
    throw std::runtime_error("collective did not complete within " + std::to_string(timeout_ms) + " ms");
  }
}

}  // namespace

c10::intrusive_ptr<c10d::Store> nibble_dist::tcp_store(const char* host, uint16_t port, int rank, int world,
                                                       int64_t timeout_ms) {
  c10d::TCPStoreOptions so;
  so.port = port;
  so.isServer = rank == 0;
  so.numWorkers = static_cast<std::size_t>(world);
  so.waitWorkers = true;
  so.timeout = std::chrono::milliseconds(timeout_ms);
  return c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
}

extern "C" {

void nibble_dist_free_error(char* msg) { std::free(msg); }

// Rendezvous at host:port (rank 0 serves the store) and build a Gloo group whose transport binds
// to `device_host` (an address of this machine), or to `device_iface` (a network interface), or,
// with both empty, to the address this machine's hostname resolves to.
char* nibble_dist_new_gloo(const char* host, uint16_t port, int rank, int world, int64_t timeout_ms,
                           const char* device_host, const char* device_iface, nibble_dist_group** out) {
  return guarded([&] {
    *out = nullptr;
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = nibble_dist::tcp_store(host, port, rank, world, timeout_ms);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (device_host != nullptr && device_host[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(device_host));
    } else if (device_iface != nullptr && device_iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(device_iface));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    opts->threads = 1;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    *out = new nibble_dist_group{store, pg};
  });
}

void nibble_dist_free_group(nibble_dist_group* g) { delete g; }

// In-place reduction over ranks of one dense contiguous tensor: `op` 0 sums, 1 takes the maximum.
char* nibble_dist_allreduce(nibble_dist_group* g, at::Tensor* t, int op, int64_t timeout_ms) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    o.timeout = std::chrono::milliseconds(timeout_ms);
    finish(g->backend->allreduce(ts, o), timeout_ms);
  });
}

// In place: every rank's tensor becomes `root`'s.
char* nibble_dist_broadcast(nibble_dist_group* g, at::Tensor* t, int root, int64_t timeout_ms) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    finish(g->backend->broadcast(ts, o), timeout_ms);
  });
}

// Returns once every rank has called it.
char* nibble_dist_barrier(nibble_dist_group* g, int64_t timeout_ms) {
  return guarded([&] {
    c10d::BarrierOptions o;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    finish(g->backend->barrier(o), timeout_ms);
  });
}

}  // extern "C"
