// nibble: gloo transport types ProcessGroupGloo.hpp holds only through smart pointers
// (see ../../README.md).
#pragma once

namespace gloo {
namespace transport {

class Device;
class UnboundBuffer;

}  // namespace transport
}  // namespace gloo
