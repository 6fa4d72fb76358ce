// Shared Python int objects for 0 .. kIntCacheSize-1.
//
// Decoding a token-id list is dominated by allocating one PyLong per element
// (20-30 ns each). Ints are immutable, so handing out shared objects is safe
// and costs only a reference-count increment. The cache is built on first use
// (about 7 MB for 2^18 ints) and lives for the life of the process.
#pragma once

#include <Python.h>

#include <cstdint>

namespace fastbcast {

inline constexpr int64_t kIntCacheSize = int64_t(1) << 18;

// Internal: the table, or NULL before first use.
extern PyObject** g_int_cache;
bool build_int_cache();

// A new reference to an int with value v.
inline PyObject* make_int(int64_t v) {
  if (uint64_t(v) < uint64_t(kIntCacheSize) && (g_int_cache || build_int_cache())) {
    PyObject* o = g_int_cache[v];
    Py_INCREF(o);
    return o;
  }
  return PyLong_FromLongLong(v);
}

}  // namespace fastbcast
