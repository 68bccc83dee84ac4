// NCCL groups for CUDA tensors (built with the `cuda` feature only): the same rendezvous as Gloo,
// then c10d's ProcessGroupNCCL from libtorch_cuda.so; `shim.cpp`'s collectives serve both.
//
// Compiled against the wheel's own CUDA and NCCL headers (nvidia/cu13/include, nvidia/nccl/include)
// with the defines torch was built with; the sizes below are the ones libtorch_cuda.so allocates
// (`operator new` before the constructors in ProcessGroupNCCL::split, torch 2.11.0).

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <c10/cuda/CUDAFunctions.h>

#include "ffi.h"

#include <chrono>
#include <cstdint>

static_assert(sizeof(c10d::ProcessGroupNCCL) == 0x458, "ProcessGroupNCCL layout differs from libtorch 2.11.0's");
static_assert(sizeof(c10d::ProcessGroupNCCL::Options) == 0xf8, "ProcessGroupNCCL::Options layout differs from libtorch 2.11.0's");

extern "C" {

// Rendezvous at host:port (rank 0 serves the store) and build an NCCL group on CUDA device
// `device` (made current); `timeout_ms` also arms NCCL's watchdog.
char* nibble_dist_new_nccl(const char* host, uint16_t port, int rank, int world, int64_t timeout_ms, int device,
                           nibble_dist_group** out) {
  return nibble_dist::guarded([&] {
    *out = nullptr;
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto store = nibble_dist::tcp_store(host, port, rank, world, timeout_ms);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
    *out = new nibble_dist_group{store, pg};
  });
}

}  // extern "C"
