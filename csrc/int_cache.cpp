#include "int_cache.h"

#include <cstdlib>
#include <cstring>

namespace fastbcast {

PyObject* g_small_ints[257] = {};
uint8_t* g_int_block = nullptr;

static_assert(sizeof(PyLongObject) <= kIntStride, "a one-digit PyLongObject must fit a cache slot");

bool build_int_cache() {
  uint8_t* block = static_cast<uint8_t*>(std::aligned_alloc(64, size_t(kIntCacheSize) * kIntStride));
  if (!block) return false;
  for (int64_t v = 0; v < kIntCacheSize; ++v) {
    PyObject* o = PyLong_FromLongLong(v);
    if (!o) {
      PyErr_Clear();
      std::free(block);  // nothing handed out yet: make_int falls back to fresh ints
      return false;
    }
    if (v <= 256) {
      g_small_ints[v] = o;  // keep CPython's own object (and our reference to it)
      continue;
    }
    // A byte copy of a fresh one-digit int (type pointer, size/tag, digit),
    // then a reference count that never drops to zero.
    PyObject* slot = reinterpret_cast<PyObject*>(block + size_t(v) * kIntStride);
    std::memcpy(static_cast<void*>(slot), static_cast<void*>(o), sizeof(PyLongObject));
#ifdef _Py_IMMORTAL_REFCNT
    slot->ob_refcnt = _Py_IMMORTAL_REFCNT;
#else
    slot->ob_refcnt = Py_ssize_t(1) << 60;
#endif
    Py_DECREF(o);
  }
  g_int_block = block;
  return true;
}

}  // namespace fastbcast
