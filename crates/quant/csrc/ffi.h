// What every C function of the fast path shares at the FFI boundary: C++ exceptions become
// malloc'd error strings (freed by `nibble_quant_free_error`), so none crosses into Rust.

#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace nibble {

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

}  // namespace nibble
