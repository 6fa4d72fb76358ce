// How far the codec's recursion may go down the calling thread's C stack.
//
// Encoding and decoding recurse once per level of nesting. kMaxDepth bounds
// the levels but not the bytes they take: a thread may have a small stack
// (threading.stack_size(), musl's 128 KiB default), and a sanitizer build has
// frames several times larger. So every walk also stops with a clean error
// once the stack it has left falls into a reserve (a quarter of the thread's
// stack) kept for the Python code it calls on the way: a __reduce__, a
// __setstate__, pickle of a deeper branch.
#pragma once

#include <cstdint>

#include "exception.h"

namespace fastbcast {

class StackGuard {
 public:
  StackGuard();
  // False once the caller's frame lies inside the reserve. A frame outside
  // the thread's stack (a sanitizer's fake stack) is not judged.
  FB_INLINE bool ok() const {
    uintptr_t sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
    return sp >= floor_ || sp < low_;
  }

 private:
  uintptr_t low_ = 0;    // the stack's lowest address
  uintptr_t floor_ = 0;  // low_ + the reserve; 0 if the bounds are unknown (no check)
};

}  // namespace fastbcast
