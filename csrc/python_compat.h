// CPython internals the codec reads directly, with one spelling per version.
#pragma once

#include <Python.h>

#include <cstdint>

namespace fastbcast {

// True (and *v set) if `o`, an exact int, is stored in a single CPython digit
// (|v| < 2^30). Reading the digit directly skips PyLong_AsLongLong's call and
// overflow handling, which dominates encoding token-id lists.
inline bool compact_long(PyObject* o, int64_t* v) {
#if PY_VERSION_HEX >= 0x030C0000
  PyLongObject* l = reinterpret_cast<PyLongObject*>(o);
  if (_PyLong_IsCompact(l)) {
    *v = _PyLong_CompactValue(l);
    return true;
  }
  return false;
#else
  Py_ssize_t size = Py_SIZE(o);
  const digit* d = reinterpret_cast<PyLongObject*>(o)->ob_digit;
  if (size == 0) {
    *v = 0;
    return true;
  }
  if (size == 1 || size == -1) {
    *v = size * int64_t(d[0]);
    return true;
  }
  return false;
#endif
}

// True if instance `o` has a non-empty __dict__, read through its dict
// slot: a tensor that never had an attribute set gets no dict made for it
// (PyObject_GenericGetDict would make one on the caller's object).
inline bool has_attributes(PyObject* o) {
  PyObject** dict = _PyObject_GetDictPtr(o);
  return dict && *dict && PyDict_GET_SIZE(*dict) > 0;
}

}  // namespace fastbcast
