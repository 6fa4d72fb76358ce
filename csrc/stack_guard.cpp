#include "stack_guard.h"

#include <pthread.h>

#include <cstddef>

namespace fastbcast {

namespace {

// The calling thread's stack bounds, looked up once per thread (for the main
// thread glibc reads /proc/self/maps to find them).
struct Bounds {
  uintptr_t low = 0;
  size_t size = 0;
};

Bounds thread_bounds() {
  Bounds b;
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) != 0) return b;
  void* addr = nullptr;
  size_t size = 0;
  if (pthread_attr_getstack(&attr, &addr, &size) == 0) {
    b.low = reinterpret_cast<uintptr_t>(addr);
    b.size = size;
  }
  pthread_attr_destroy(&attr);
  return b;
}

}  // namespace

StackGuard::StackGuard() {
  thread_local Bounds bounds = thread_bounds();
  if (bounds.size) {
    low_ = bounds.low;
    floor_ = bounds.low + bounds.size / 4;
  }
}

}  // namespace fastbcast
