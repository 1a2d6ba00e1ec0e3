// How the C entry points called from Rust report a C++ exception: its message is copied into the
// caller's buffer (truncated to fit) and the entry point returns non-zero.
#pragma once
#include <cstddef>
#include <cstdio>

namespace linearize {

inline void set_error(char* err, size_t len, const char* what) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", what);
  }
}

}  // namespace linearize
