// Shared by the project's C++ shims over libtorch (dim-scan's autograd op,
// dim-model's multi-tensor optimizer ops): C++ exceptions become a non-zero
// return code and a message in the caller's buffer, so Rust can turn them
// into typed errors instead of aborting.
#ifndef DIM_SHIM_H
#define DIM_SHIM_H

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace dim_shim {

inline void set_error(char* err, size_t len, const char* msg) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, msg, len - 1);
  err[len - 1] = '\0';
}

// Runs `body`; returns 0, or 1 with the exception's message in `err`.
template <typename F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace dim_shim

#endif  // DIM_SHIM_H
