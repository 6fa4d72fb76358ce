#include "int_cache.h"

namespace fastbcast {

PyObject** g_int_cache = nullptr;

bool build_int_cache() {
  // Built whole and published at the end, so a failed build leaves no
  // half-filled table behind (make_int then falls back to fresh ints).
  PyObject** table = new PyObject*[kIntCacheSize];
  for (int64_t i = 0; i < kIntCacheSize; ++i) {
    table[i] = PyLong_FromLongLong(i);
    if (!table[i]) {
      for (int64_t j = 0; j < i; ++j) Py_DECREF(table[j]);
      delete[] table;
      PyErr_Clear();
      return false;
    }
  }
  g_int_cache = table;
  return true;
}

}  // namespace fastbcast
