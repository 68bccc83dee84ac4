// nibble: nothing from gloo/common/error.h is named by ProcessGroupGloo.hpp (see ../../README.md).
#pragma once
