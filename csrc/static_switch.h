// Turns a runtime head size into a compile-time template argument (causal-conv1d style), so one build
// serves every supported head size instead of baking a single -D_N_ macro into the binary.
#pragma once

#include <c10/util/Exception.h>

#define WKV5_HEAD_SIZE_SWITCH(n, CONST_NAME, ...)                                        \
  [&] {                                                                                  \
    if ((n) == 64) {                                                                     \
      constexpr int CONST_NAME = 64;                                                     \
      return __VA_ARGS__();                                                              \
    } else if ((n) == 128) {                                                             \
      constexpr int CONST_NAME = 128;                                                    \
      return __VA_ARGS__();                                                              \
    } else if ((n) == 32) {                                                              \
      constexpr int CONST_NAME = 32;                                                     \
      return __VA_ARGS__();                                                              \
    } else if ((n) == 16) {                                                              \
      constexpr int CONST_NAME = 16;                                                     \
      return __VA_ARGS__();                                                              \
    } else {                                                                             \
      TORCH_CHECK(false, "wkv5: head size ", (n), " is not compiled; use 16, 32, 64 or 128"); \
    }                                                                                    \
  }()
