// Check macros for fastbcast's C++ code.
//
// FB_CHECK is for anything a caller can get wrong (arguments, sizes, state):
// it throws c10::Error, which pybind11 turns into a Python RuntimeError /
// ValueError with the message. FB_ASSERT is for our own invariants: a failure
// is a bug in fastbcast, and the message says so.
#pragma once

#include <c10/util/Exception.h>

#define FB_CHECK(cond, ...) TORCH_CHECK(cond, "fastbcast: ", __VA_ARGS__)
#define FB_ASSERT(cond, ...) TORCH_INTERNAL_ASSERT(cond, "fastbcast internal error: ", ##__VA_ARGS__)

#if defined(__GNUC__)
#define FB_LIKELY(x) __builtin_expect(!!(x), 1)
#define FB_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define FB_INLINE inline __attribute__((always_inline))
#else
#define FB_LIKELY(x) (x)
#define FB_UNLIKELY(x) (x)
#define FB_INLINE inline
#endif
