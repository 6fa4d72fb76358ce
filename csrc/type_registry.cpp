#include "type_registry.h"

#include <cstring>

namespace fastbcast {

namespace {

// A module already loaded by the process, or NULL. Never imports: a package
// the process has not loaded cannot own the object being encoded.
PyObject* loaded_module(const char* name) {
  return PyDict_GetItemString(PyImport_GetModuleDict(), name);  // borrowed
}

PyObject* loaded_attr(const char* module, const char* attr) {
  PyObject* m = loaded_module(module);
  if (!m) return nullptr;
  return PyDict_GetItemString(PyModule_GetDict(m), attr);  // borrowed
}

// 1 if `cls` subclasses module.attr (a class), 0 if not or not loaded, -1 on error.
int subclass_of(PyObject* cls, const char* module, const char* attr) {
  PyObject* base = loaded_attr(module, attr);
  if (!base || !PyType_Check(base)) return 0;
  return PyObject_IsSubclass(cls, base);
}

PyObject* tuple_of_names(PyObject* iterable, const char* attr) {
  // attr == NULL: the items are the names; else read item.<attr>.
  PyObject* seq = PySequence_Fast(iterable, "field list is not iterable");
  if (!seq) return nullptr;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject* out = PyTuple_New(n);
  for (Py_ssize_t i = 0; out && i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    PyObject* name = attr ? PyObject_GetAttrString(item, attr) : (Py_INCREF(item), item);
    if (!name || !PyUnicode_Check(name)) {
      Py_XDECREF(name);
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "field names must be str");
      Py_CLEAR(out);
      break;
    }
    PyTuple_SET_ITEM(out, i, name);
  }
  Py_DECREF(seq);
  return out;
}

}  // namespace

TypeRegistry& TypeRegistry::instance() {
  static TypeRegistry* r = new TypeRegistry();  // holds Python objects: never destroyed at exit
  return *r;
}

bool TypeRegistry::classify(PyObject* cls, TypeInfo* out) {
  out->kind = Kind::UNSUPPORTED;
  int r;
  PyObject* fields = nullptr;
  if ((r = subclass_of(cls, "enum", "Enum")) != 0) {
    if (r < 0) return false;
    out->kind = Kind::ENUM;
  } else if ((r = subclass_of(cls, "pydantic", "BaseModel")) != 0) {
    if (r < 0) return false;
    PyObject* mf = PyObject_GetAttrString(cls, "model_fields");
    if (!mf) return false;
    fields = tuple_of_names(mf, nullptr);  // iterating a dict gives its keys
    Py_DECREF(mf);
    if (!fields) return false;
    out->kind = Kind::PYDANTIC;
  } else if ((r = subclass_of(cls, "msgspec", "Struct")) != 0) {
    if (r < 0) return false;
    PyObject* sf = PyObject_GetAttrString(cls, "__struct_fields__");
    if (!sf) return false;
    fields = tuple_of_names(sf, nullptr);
    Py_DECREF(sf);
    if (!fields) return false;
    out->kind = Kind::STRUCT;
  } else if (PyObject_HasAttrString(cls, "__dataclass_fields__")) {
    PyObject* dc = PyImport_ImportModule("dataclasses");  // stdlib; needed to tell fields from ClassVars
    if (!dc) return false;
    PyObject* fl = PyObject_CallMethod(dc, "fields", "O", cls);
    Py_DECREF(dc);
    if (!fl) return false;
    fields = tuple_of_names(fl, "name");
    Py_DECREF(fl);
    if (!fields) return false;
    out->kind = Kind::DATACLASS;
  } else {
    return true;
  }
  PyObject* mod = PyObject_GetAttrString(cls, "__module__");
  PyObject* qual = mod ? PyObject_GetAttrString(cls, "__qualname__") : nullptr;
  if (!qual || !PyUnicode_Check(mod) || !PyUnicode_Check(qual)) {
    Py_XDECREF(mod);
    Py_XDECREF(qual);
    Py_XDECREF(fields);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "class has no str __module__/__qualname__");
    return false;
  }
  out->name = PyUnicode_FromFormat("%U:%U", mod, qual);
  Py_DECREF(mod);
  Py_DECREF(qual);
  if (!out->name) {
    Py_XDECREF(fields);
    return false;
  }
  Py_INCREF(cls);
  out->cls = cls;
  out->fields = fields;
  return true;
}

const TypeInfo* TypeRegistry::for_encode(PyTypeObject* type) {
  auto it = by_type_.find(type);
  if (it != by_type_.end()) return &it->second;
  TypeInfo info;
  if (!classify(reinterpret_cast<PyObject*>(type), &info)) return nullptr;
  if (info.kind == Kind::UNSUPPORTED) {
    // Remember the negative answer too; keep the type alive so its address
    // cannot be reused by another class.
    Py_INCREF(type);
    info.cls = reinterpret_cast<PyObject*>(type);
  }
  return &by_type_.emplace(type, info).first->second;
}

bool TypeRegistry::register_class(PyObject* cls) {
  if (!PyType_Check(cls)) {
    PyErr_Format(PyExc_TypeError, "fastbcast.register() takes a class, got %R", cls);
    return false;
  }
  const TypeInfo* info = for_encode(reinterpret_cast<PyTypeObject*>(cls));
  if (!info) return false;
  if (info->kind == Kind::UNSUPPORTED) {
    PyErr_Format(PyExc_TypeError,
                 "fastbcast.register(%R): only enum.Enum subclasses, dataclasses, pydantic v2 models and "
                 "msgspec Structs can be registered", cls);
    return false;
  }
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(info->name, &n);
  if (!s) return false;
  by_name_[std::string(s, n)] = *info;
  return true;
}

void TypeRegistry::add_trusted_prefix(const std::string& prefix) {
  for (auto& p : trusted_)
    if (p == prefix) return;
  trusted_.push_back(prefix);
}

PyObject* TypeRegistry::registered_names() {
  PyObject* out = PyList_New(0);
  for (auto& kv : by_name_) {
    PyObject* s = PyUnicode_FromStringAndSize(kv.first.data(), kv.first.size());
    if (!s || PyList_Append(out, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(s);
  }
  return out;
}

static bool prefix_matches(const char* mod, size_t n, const char* p, size_t pn) {
  // "pkg" trusts pkg and pkg.*; "pkg." trusts pkg.* only.
  if (pn == 0 || pn > n || std::memcmp(mod, p, pn) != 0) return false;
  return pn == n || p[pn - 1] == '.' || mod[pn] == '.';
}

bool TypeRegistry::trusted(const char* name, Py_ssize_t n, PyObject* extra_trusted) {
  const char* colon = static_cast<const char*>(std::memchr(name, ':', n));
  if (!colon) return false;
  size_t mn = colon - name;
  for (auto& p : trusted_)
    if (prefix_matches(name, mn, p.data(), p.size())) return true;
  if (extra_trusted && PyTuple_Check(extra_trusted)) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(extra_trusted); ++i) {
      Py_ssize_t pn;
      const char* p = PyUnicode_Check(PyTuple_GET_ITEM(extra_trusted, i))
                          ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(extra_trusted, i), &pn)
                          : nullptr;
      if (p && prefix_matches(name, mn, p, pn)) return true;
    }
  }
  return false;
}

const TypeInfo* TypeRegistry::for_decode(PyObject* name, PyObject* extra_trusted) {
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(name, &n);
  if (!s) return nullptr;
  auto it = by_name_.find(std::string(s, n));
  if (it != by_name_.end()) return &it->second;
  if (!trusted(s, n, extra_trusted)) return nullptr;

  // Trusted prefix: find the class among loaded modules only.
  std::string full(s, n);
  size_t colon = full.find(':');
  std::string mod = full.substr(0, colon), qual = full.substr(colon + 1);
  if (qual.empty() || qual.find("<locals>") != std::string::npos) return nullptr;
  PyObject* m = loaded_module(mod.c_str());
  if (!m) return nullptr;
  PyObject* obj = m;
  Py_INCREF(obj);
  size_t start = 0;
  while (start <= qual.size()) {
    size_t dot = qual.find('.', start);
    std::string part = qual.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    PyObject* next = (obj == m) ? PyDict_GetItemString(PyModule_GetDict(m), part.c_str()) : nullptr;
    if (obj == m) {
      Py_XINCREF(next);
    } else {
      next = PyObject_GetAttrString(obj, part.c_str());
      if (!next) PyErr_Clear();
    }
    Py_DECREF(obj);
    if (!next) return nullptr;
    obj = next;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  if (!PyType_Check(obj)) {
    Py_DECREF(obj);
    return nullptr;
  }
  const TypeInfo* info = for_encode(reinterpret_cast<PyTypeObject*>(obj));
  Py_DECREF(obj);  // the cache holds its own reference
  if (!info || info->kind == Kind::UNSUPPORTED) return nullptr;
  // The walk may have reached a class defined elsewhere (an imported name,
  // `trusted_mod:enum.Enum`): only a class whose own module and qualname are
  // the wire name counts, so trust never extends past the prefix.
  if (PyUnicode_Compare(info->name, name) != 0) return nullptr;
  return info;
}

}  // namespace fastbcast
