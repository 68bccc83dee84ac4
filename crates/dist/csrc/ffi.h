// What the C functions of `dist` share: the group handle Rust holds, and C++ exceptions turned
// into malloc'd messages (freed by `nibble_dist_free_error`), so none crosses into Rust.

#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

// A rendezvous store and the backend built on it (Gloo or NCCL).
struct nibble_dist_group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace nibble_dist {

inline char* error_message(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

// Runs `f`; returns nullptr, or the message of the exception it threw.
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return error_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception");
  }
}

// The rendezvous: rank 0 serves a TCPStore at host:port that waits up to `timeout_ms` for all
// `world` ranks; the others connect to it within the same time.
c10::intrusive_ptr<c10d::Store> tcp_store(const char* host, uint16_t port, int rank, int world, int64_t timeout_ms);

}  // namespace nibble_dist
