// nibble: nothing from gloo/algorithm.h is named by ProcessGroupGloo.hpp (see ../README.md).
#pragma once
