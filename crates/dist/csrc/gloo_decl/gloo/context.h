// nibble: the one member of gloo::Context that ProcessGroupGloo.hpp's inline `setTimeout` names
// (declared only; nibble never calls it, see ../README.md).
#pragma once

#include <chrono>

namespace gloo {

class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
