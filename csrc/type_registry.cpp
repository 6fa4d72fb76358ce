#include "type_registry.h"

#include <cstring>

namespace fastbcast {

namespace {

// A module already loaded by the process, or NULL. Never imports: a package
// the process has not loaded cannot own the object being encoded. An entry
// that is not a module (sys.modules["numpy"] = None blocks an import) is none.
PyObject* loaded_module(const char* name) {
  PyObject* m = PyDict_GetItemString(PyImport_GetModuleDict(), name);  // borrowed
  return m && PyModule_Check(m) ? m : nullptr;
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

// What `type` resolves `name` to along its MRO (borrowed), or NULL.
PyObject* lookup(PyObject* type, const char* name) {
  PyObject* s = PyUnicode_InternFromString(name);
  if (!s) return nullptr;
  PyObject* r = _PyType_Lookup(reinterpret_cast<PyTypeObject*>(type), s);
  Py_DECREF(s);
  return r;
}

// True if `cls` resolves every one of `names` to what `base` resolves it to:
// the class keeps the base's pickle protocol.
bool same_protocol(PyObject* cls, PyObject* base, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (lookup(cls, n) != lookup(base, n)) return false;
  return true;
}

PyObject* names_tuple(PyObject* iterable) {
  PyObject* t = PySequence_Tuple(iterable);
  if (!t) return nullptr;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(t); ++i) {
    PyObject* s = PyTuple_GET_ITEM(t, i);
    if (!PyUnicode_Check(s)) {
      Py_DECREF(t);
      PyErr_SetString(PyExc_TypeError, "field names must be str");
      return nullptr;
    }
    Py_INCREF(s);
    PyUnicode_InternInPlace(&s);  // may swap in the interned copy (a new reference either way)
    Py_DECREF(PyTuple_GET_ITEM(t, i));
    PyTuple_SET_ITEM(t, i, s);
  }
  return t;
}

// The class's __slots__ as pickle collects them (copyreg._slotnames), a
// tuple of interned str; new reference.
PyObject* slot_names(PyObject* cls) {
  PyObject* copyreg = PyImport_ImportModule("copyreg");  // stdlib
  PyObject* sn = copyreg ? PyObject_CallMethod(copyreg, "_slotnames", "O", cls) : nullptr;
  Py_XDECREF(copyreg);
  if (!sn) return nullptr;
  PyObject* t = names_tuple(sn);
  Py_DECREF(sn);
  return t;
}

// Classes the codec rebuilds without being asked: their pickle protocol
// names the class itself, or (nn.Parameter; torch.Tensor, a leaf requiring grad)
// the codec rebuilds it as torch's own rebuild function does, and building one runs no user code.
struct Builtin {
  const char* module;
  const char* name;
};
constexpr Builtin kBuiltins[] = {
    {"datetime", "datetime"}, {"datetime", "date"},       {"datetime", "time"},        {"datetime", "timedelta"},
    {"datetime", "timezone"}, {"uuid", "UUID"},           {"decimal", "Decimal"},      {"collections", "OrderedDict"},
    {"collections", "defaultdict"}, {"collections", "deque"}, {"builtins", "range"},   {"builtins", "slice"},
    {"builtins", "list"},     {"builtins", "dict"},       {"builtins", "set"},         {"builtins", "frozenset"},
    {"builtins", "tuple"},    {"builtins", "int"},        {"builtins", "float"},       {"builtins", "str"},
    {"builtins", "bytes"},    {"builtins", "bool"},       {"builtins", "complex"},     {"builtins", "bytearray"},
    {"builtins", "object"},   {"torch.nn.parameter", "Parameter"}, {"torch", "Tensor"},
};

const Builtin* builtin_named(const char* s, Py_ssize_t n) {
  for (const Builtin& b : kBuiltins) {
    size_t mn = std::strlen(b.module), an = std::strlen(b.name);
    if (size_t(n) == mn + 1 + an && std::memcmp(s, b.module, mn) == 0 && s[mn] == ':' &&
        std::memcmp(s + mn + 1, b.name, an) == 0)
      return &b;
  }
  return nullptr;
}

PyObject* forget_callback(PyObject* self, PyObject* /*weakref*/) {
  TypeRegistry::instance().forget(static_cast<PyTypeObject*>(PyLong_AsVoidPtr(self)));
  Py_RETURN_NONE;
}
PyMethodDef kForgetDef = {"_fastbcast_forget_class", forget_callback, METH_O, nullptr};

// Weakrefs whose callback ran; released on the next cache insert rather than
// inside their own callback.
std::vector<PyObject*> g_dead_weakrefs;

}  // namespace

const char* utf8_or(PyObject* s, const char* fallback) {
  const char* u = (s && PyUnicode_Check(s)) ? PyUnicode_AsUTF8(s) : nullptr;
  if (!u) {
    if (PyErr_Occurred()) clear_unless_fatal();
    return fallback;
  }
  return u;
}

bool pending_is_fatal() {
  PyObject* t = PyErr_Occurred();
  return t && !PyErr_GivenExceptionMatches(t, PyExc_Exception);
}

bool clear_unless_fatal() {
  if (!PyErr_Occurred() || pending_is_fatal()) return false;
  PyErr_Clear();
  return true;
}

TypeRegistry& TypeRegistry::instance() {
  static TypeRegistry* r = new TypeRegistry();  // holds Python objects: never destroyed at exit
  return *r;
}

bool TypeRegistry::classify(PyObject* cls, TypeInfo* out) {
  out->kind = Kind::REDUCE;
  PyTypeObject* tp = reinterpret_cast<PyTypeObject*>(cls);
  PyObject* mod = PyObject_GetAttrString(cls, "__module__");
  PyObject* qual = mod ? PyObject_GetAttrString(cls, "__qualname__") : nullptr;
  if (mod && qual && PyUnicode_Check(mod) && PyUnicode_Check(qual)) {
    out->name = PyUnicode_FromFormat("%U:%U", mod, qual);
  } else if (!clear_unless_fatal() && PyErr_Occurred()) {
    Py_XDECREF(mod);
    Py_XDECREF(qual);
    return false;
  }
  Py_XDECREF(mod);
  Py_XDECREF(qual);
  if (!out->name) {
    if (PyErr_Occurred() && !clear_unless_fatal()) return false;
    out->kind = Kind::UNSUPPORTED;  // no wire name: only pickle can carry it
    return true;
  }
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(out->name, &n);
  if (!s) return false;
  out->builtin_trusted = builtin_named(s, n) != nullptr;
  out->user_class = PyType_HasFeature(tp, Py_TPFLAGS_HEAPTYPE);

  PyObject* object = reinterpret_cast<PyObject*>(&PyBaseObject_Type);
  int r;
  if (loaded_attr("numpy", "ndarray") == cls) {
    out->kind = Kind::NDARRAY;
  } else if (loaded_attr("array", "array") == cls) {
    out->kind = Kind::PYARRAY;
  } else if ((r = subclass_of(cls, "numpy", "generic")) != 0) {
    if (r < 0) return false;
    out->kind = Kind::NPSCALAR;
  } else if ((r = subclass_of(cls, "torch", "Tensor")) != 0) {
    if (r < 0) return false;
    // nn.Parameter pickles through torch._utils._rebuild_parameter, other
    // subclasses through _rebuild_from_type_v2: both rebuild the values as
    // the subclass with requires_grad and the instance __dict__, which the
    // codec does itself. A subclass that changes that protocol (its own
    // __reduce_ex__, __getstate__, __torch_function__, __slots__) stays REDUCE.
    PyObject* tensor = loaded_attr("torch", "Tensor");
    bool keeps = cls == loaded_attr("torch.nn.parameter", "Parameter") ||
                 same_protocol(cls, tensor, {"__reduce__", "__reduce_ex__", "__getstate__", "__setstate__",
                                             "__torch_function__", "__torch_dispatch__"});
    if (keeps) {
      PyObject* sn = slot_names(cls);
      if (!sn) return false;
      keeps = PyTuple_GET_SIZE(sn) == 0;
      Py_DECREF(sn);
    }
    if (keeps) out->kind = Kind::TENSOR;
  } else if ((r = subclass_of(cls, "msgspec", "Struct")) != 0) {
    if (r < 0) return false;
    PyObject* base = loaded_attr("msgspec", "Struct");
    PyObject* sf = PyObject_GetAttrString(cls, "__struct_fields__");
    if (!sf) return false;
    out->fields = names_tuple(sf);
    Py_DECREF(sf);
    if (!out->fields) return false;
    bool ok = same_protocol(cls, base, {"__reduce__", "__reduce_ex__", "__getstate__", "__setstate__"});
    for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(out->fields); ++i) {
      PyObject* d = _PyType_Lookup(tp, PyTuple_GET_ITEM(out->fields, i));
      ok = d && Py_TYPE(d) == &PyMemberDescr_Type;
      PyMemberDef* m = ok ? reinterpret_cast<PyMemberDescrObject*>(d)->d_member : nullptr;
      ok = ok && m->type == T_OBJECT_EX && !(m->flags & READONLY);
      if (ok) out->members.push_back(m);
    }
    if (ok) {
      out->kind = Kind::STRUCT;
    } else {
      Py_CLEAR(out->fields);
      out->members.clear();
    }
  } else if ((r = subclass_of(cls, "pydantic", "BaseModel")) != 0) {
    if (r < 0) return false;
    PyObject* base = loaded_attr("pydantic", "BaseModel");
    if (!pyd_.extra) {
      PyObject* d = reinterpret_cast<PyTypeObject*>(base)->tp_dict;
      PyMemberDef** slots[] = {&pyd_.extra, &pyd_.fields_set, &pyd_.priv};
      const char* names[] = {"__pydantic_extra__", "__pydantic_fields_set__", "__pydantic_private__"};
      for (int i = 0; i < 3; ++i) {
        PyObject* m = PyDict_GetItemString(d, names[i]);
        if (m && Py_TYPE(m) == &PyMemberDescr_Type) *slots[i] = reinterpret_cast<PyMemberDescrObject*>(m)->d_member;
      }
    }
    if (pyd_.extra && pyd_.fields_set && pyd_.priv &&
        same_protocol(cls, base, {"__getstate__", "__setstate__", "__getnewargs__", "__getnewargs_ex__"}) &&
        same_protocol(cls, object, {"__reduce__", "__reduce_ex__", "__new__"}))
      out->kind = Kind::PYDANTIC;
  } else if (out->user_class && tp->tp_new == PyBaseObject_Type.tp_new && tp->tp_itemsize == 0 &&
             same_protocol(cls, object, {"__reduce__", "__reduce_ex__", "__getstate__", "__setstate__",
                                         "__getnewargs__", "__getnewargs_ex__"})) {
    // Every base but object must be a Python class too: a list or dict
    // subclass pickles its items through __reduce_ex__'s list/dict items.
    bool plain = true;
    PyObject* mro = tp->tp_mro;
    for (Py_ssize_t i = 0; plain && mro && i < PyTuple_GET_SIZE(mro); ++i) {
      PyObject* b = PyTuple_GET_ITEM(mro, i);
      plain = b == object || PyType_HasFeature(reinterpret_cast<PyTypeObject*>(b), Py_TPFLAGS_HEAPTYPE);
    }
    if (plain) {
      out->fields = slot_names(cls);
      if (!out->fields) return false;
      out->kind = Kind::OBJECT;
    }
  }
  return true;
}

TypeInfo* TypeRegistry::for_encode(PyTypeObject* type) {
  auto it = by_type_.find(type);
  if (it != by_type_.end()) return &it->second;
  for (PyObject* w : g_dead_weakrefs) Py_DECREF(w);
  g_dead_weakrefs.clear();
  TypeInfo info;
  PyObject* cls = reinterpret_cast<PyObject*>(type);
  if (!classify(cls, &info)) {
    Py_XDECREF(info.name);
    Py_XDECREF(info.fields);
    return nullptr;
  }
  info.cls = cls;
  // The entry must not outlive the class (its address could be reused by
  // another one), nor keep it alive: a weakref drops the entry when the class
  // goes. Static types live for the whole process.
  if (PyType_HasFeature(type, Py_TPFLAGS_HEAPTYPE)) {
    PyObject* key = PyLong_FromVoidPtr(type);
    PyObject* cb = key ? PyCFunction_New(&kForgetDef, key) : nullptr;
    Py_XDECREF(key);
    PyObject* wr = cb ? PyWeakref_NewRef(cls, cb) : nullptr;
    Py_XDECREF(cb);
    if (!wr) {
      Py_XDECREF(info.name);
      Py_XDECREF(info.fields);
      return nullptr;
    }
    weakrefs_[type] = wr;
  }
  return &by_type_.emplace(type, std::move(info)).first->second;
}

void TypeRegistry::forget(PyTypeObject* type) {
  auto it = by_type_.find(type);
  if (it != by_type_.end()) {
    Py_XDECREF(it->second.name);
    Py_XDECREF(it->second.fields);
    by_type_.erase(it);
  }
  auto w = weakrefs_.find(type);
  if (w != weakrefs_.end()) {
    g_dead_weakrefs.push_back(w->second);
    weakrefs_.erase(w);
  }
}

bool TypeRegistry::register_class(PyObject* cls) {
  if (!PyType_Check(cls)) {
    PyErr_Format(PyExc_TypeError, "fastbcast.register() takes a class, got %R", cls);
    return false;
  }
  const TypeInfo* info = for_encode(reinterpret_cast<PyTypeObject*>(cls));
  if (!info) return false;
  if (info->kind == Kind::UNSUPPORTED || !info->user_class) {
    PyErr_Format(PyExc_TypeError,
                 "fastbcast.register(%R): only classes defined in Python (dataclasses, pydantic models, msgspec "
                 "Structs, enums, classes with __dict__/__slots__ or their own pickle protocol) can be registered",
                 cls);
    return false;
  }
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(info->name, &n);
  if (!s) return false;
  auto& slot = by_name_[std::string(s, n)];
  Py_INCREF(cls);
  Py_XSETREF(slot, cls);
  ++gen_;
  return true;
}

void TypeRegistry::add_trusted_prefix(const std::string& prefix) {
  for (auto& p : trusted_)
    if (p == prefix) return;
  trusted_.push_back(prefix);
  ++gen_;
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
      PyObject* item = PyTuple_GET_ITEM(extra_trusted, i);
      const char* p = PyUnicode_Check(item) ? PyUnicode_AsUTF8AndSize(item, &pn) : nullptr;
      if (!p) clear_unless_fatal();
      if (p && prefix_matches(name, mn, p, pn)) return true;
    }
  }
  return false;
}

bool TypeRegistry::may_write(TypeInfo* info, PyObject* extra_trusted) {
  if (!info->name) return false;
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(info->name, &n);
  if (!s) return clear_unless_fatal() && false;
  if (info->trust_gen != gen_) {
    auto it = by_name_.find(std::string(s, n));
    info->trusted_now = info->builtin_trusted || (it != by_name_.end() && it->second == info->cls) ||
                        trusted(s, n, nullptr);
    info->trust_gen = gen_;
  }
  return info->trusted_now || (extra_trusted && trusted(s, n, extra_trusted));
}

TypeInfo* TypeRegistry::for_decode(const char* s, size_t n, PyObject* extra_trusted) {
  std::string key(s, n);
  auto c = decoded_names_.find(key);
  if (c != decoded_names_.end()) {
    // The class may have gone (its entry is then missing) or its address been
    // reused by another one (its name then differs): check both.
    auto it = by_type_.find(c->second);
    Py_ssize_t m;
    const char* have = it != by_type_.end() && it->second.name ? PyUnicode_AsUTF8AndSize(it->second.name, &m) : nullptr;
    if (have && size_t(m) == n && std::memcmp(have, s, n) == 0) {
      TypeInfo* info = &it->second;
      return may_write(info, extra_trusted) ? info : nullptr;  // trust may have changed since
    }
    if (PyErr_Occurred()) return nullptr;
  }
  PyObject* name = PyUnicode_DecodeUTF8(s, Py_ssize_t(n), "strict");
  if (!name) return nullptr;
  TypeInfo* info = for_decode(name, extra_trusted);
  Py_DECREF(name);
  if (info) decoded_names_[key] = reinterpret_cast<PyTypeObject*>(info->cls);
  return info;
}

// The wire name of `o` from its own __module__ and __qualname__ (new
// reference), or nullptr with no error set if it has none.
static PyObject* own_name(PyObject* o) {
  PyObject* mod = PyObject_GetAttrString(o, "__module__");
  PyObject* qual = mod ? PyObject_GetAttrString(o, "__qualname__") : nullptr;
  PyObject* out = mod && qual && PyUnicode_Check(mod) && PyUnicode_Check(qual)
                      ? PyUnicode_FromFormat("%U:%U", mod, qual) : nullptr;
  Py_XDECREF(mod);
  Py_XDECREF(qual);
  if (!out) clear_unless_fatal();
  return out;
}

PyObject* TypeRegistry::resolve_loaded(const char* s, size_t n) {
  std::string full(s, n);
  size_t colon = full.find(':');
  if (colon == std::string::npos) return nullptr;
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
    PyObject* next;
    if (obj == m) {
      next = PyDict_GetItemString(PyModule_GetDict(m), part.c_str());
      Py_XINCREF(next);
    } else {
      next = PyObject_GetAttrString(obj, part.c_str());
      if (!next && !clear_unless_fatal()) {
        Py_DECREF(obj);
        return nullptr;
      }
    }
    Py_DECREF(obj);
    if (!next) return nullptr;
    obj = next;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  // The walk may have reached an object defined elsewhere (an imported name,
  // `trusted_mod:os.system`): only one whose own module and qualname are the
  // wire name counts, so trust never extends past the prefix.
  PyObject* own = own_name(obj);
  Py_ssize_t on = 0;
  const char* os = own ? PyUnicode_AsUTF8AndSize(own, &on) : nullptr;
  bool same = os && size_t(on) == n && std::memcmp(os, s, n) == 0;
  Py_XDECREF(own);
  if (!same) {
    clear_unless_fatal();
    Py_DECREF(obj);
    return nullptr;
  }
  return obj;
}

PyObject* TypeRegistry::callable_name(PyObject* fn, PyObject* extra_trusted, bool* findable) {
  *findable = false;
  PyObject* name = own_name(fn);
  if (!name) return nullptr;
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(name, &n);
  // The receivers find the callable by this name: it must lead back to `fn`.
  PyObject* found = s ? resolve_loaded(s, size_t(n)) : nullptr;
  int same = found ? PyObject_RichCompareBool(found, fn, Py_EQ) : 0;
  Py_XDECREF(found);
  *findable = same == 1;
  if (*findable) {
    auto it = by_name_.find(std::string(s, n));
    if ((it != by_name_.end() && it->second == fn) || trusted(s, n, extra_trusted)) return name;
  }
  clear_unless_fatal();
  Py_DECREF(name);
  return nullptr;
}

PyObject* TypeRegistry::callable_for_decode(const char* s, size_t n, PyObject* extra_trusted) {
  auto it = by_name_.find(std::string(s, n));
  if (it != by_name_.end()) {
    Py_INCREF(it->second);
    return it->second;
  }
  if (!trusted(s, Py_ssize_t(n), extra_trusted)) return nullptr;
  PyObject* fn = resolve_loaded(s, n);
  if (fn && !PyCallable_Check(fn)) Py_CLEAR(fn);
  return fn;
}

TypeInfo* TypeRegistry::for_decode(PyObject* name, PyObject* extra_trusted) {
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(name, &n);
  if (!s) return nullptr;
  PyObject* obj = nullptr;
  auto it = by_name_.find(std::string(s, n));
  if (it != by_name_.end()) {
    obj = it->second;
    Py_INCREF(obj);
  } else if (const Builtin* b = builtin_named(s, n)) {
    // A fixed list of standard-library modules, not a name from the bytes.
    PyObject* m = PyImport_ImportModule(b->module);
    if (!m) return nullptr;
    obj = PyObject_GetAttrString(m, b->name);
    Py_DECREF(m);
    if (!obj) return nullptr;
  } else {
    if (!trusted(s, n, extra_trusted)) return nullptr;
    obj = resolve_loaded(s, n);
    if (!obj) return nullptr;
  }
  if (!PyType_Check(obj)) {
    Py_DECREF(obj);
    return nullptr;
  }
  TypeInfo* info = for_encode(reinterpret_cast<PyTypeObject*>(obj));
  Py_DECREF(obj);  // callers hold the class themselves while they use it
  if (!info || !info->name) return nullptr;
  // The walk may have reached a class defined elsewhere (an imported name,
  // `trusted_mod:enum.Enum`): only a class whose own module and qualname are
  // the wire name counts, so trust never extends past the prefix.
  int c = PyUnicode_Compare(info->name, name);
  if (c != 0) {
    if (c == -1 && PyErr_Occurred()) return nullptr;
    return nullptr;
  }
  return info;
}

}  // namespace fastbcast
