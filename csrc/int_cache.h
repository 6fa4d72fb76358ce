// Shared Python int objects for 0 .. kIntCacheSize-1.
//
// Decoding a token-id list is dominated by allocating one PyLong per element
// (20-30 ns each). Ints are immutable, so handing out shared objects is safe
// and costs only a reference-count increment. The cache is built on first use
// and lives for the life of the process.
//
// 0..256 are CPython's own small ints (so `is` behaves as everywhere else).
// The rest are laid out in one array, kIntStride bytes apart, so the object
// for v is found by arithmetic instead of a pointer table: a random token id
// costs one cache miss instead of two, and the decoder can prefetch it. They
// are made immortal (3.12+) or given a reference count that cannot reach zero
// (3.11), so nothing ever frees them; about 8 MB.
#pragma once

#include <Python.h>

#include <cstdint>

namespace fastbcast {

inline constexpr int64_t kIntCacheSize = int64_t(1) << 18;
inline constexpr size_t kIntStride = 32;

// Internal: filled by build_int_cache(); NULL before first use.
extern PyObject* g_small_ints[257];
extern uint8_t* g_int_block;
bool build_int_cache();

inline PyObject* cached_int(int64_t v) {
  return v <= 256 ? g_small_ints[v] : reinterpret_cast<PyObject*>(g_int_block + size_t(v) * kIntStride);
}

// A new reference to an int with value v.
inline PyObject* make_int(int64_t v) {
  if (uint64_t(v) < uint64_t(kIntCacheSize) && (g_int_block || build_int_cache())) {
    PyObject* o = cached_int(v);
    Py_INCREF(o);
    return o;
  }
  return PyLong_FromLongLong(v);
}

// Starts loading the object for v into cache (the decoder calls it a few
// elements ahead of make_int).
inline void prefetch_int(int64_t v) {
  if (uint64_t(v) < uint64_t(kIntCacheSize) && g_int_block) __builtin_prefetch(g_int_block + size_t(v) * kIntStride, 1);
}

}  // namespace fastbcast
