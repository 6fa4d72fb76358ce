#include "decoder.h"

#include <cstdarg>
#include <cstring>
#include <string>
#include <unordered_map>

#include "exception.h"
#include "int_cache.h"
#include "tensor_codec.h"
#include "type_registry.h"
#include "wire.h"

namespace fastbcast {

namespace {

PyObject* g_decode_error = nullptr;

// Replaces the pending Python exception with DecodeError("<prefix> (<type>:
// <message>)"), keeping the original as __cause__ so nothing is lost.
void raise_decode_error_from_pending(const char* prefix) {
  PyObject *et, *ev, *tb;
  PyErr_Fetch(&et, &ev, &tb);
  PyErr_NormalizeException(&et, &ev, &tb);
  PyObject* s = ev ? PyObject_Str(ev) : nullptr;
  const char* m = s ? PyUnicode_AsUTF8(s) : nullptr;
  if (!m) PyErr_Clear();
  PyErr_Format(g_decode_error, "%s (%s: %s)", prefix, et ? reinterpret_cast<PyTypeObject*>(et)->tp_name : "error",
               m ? m : "?");
  Py_XDECREF(s);
  PyObject *nt, *nv, *ntb;
  PyErr_Fetch(&nt, &nv, &ntb);
  PyErr_NormalizeException(&nt, &nv, &ntb);
  if (ev) PyException_SetCause(nv, ev);  // steals ev
  PyErr_Restore(nt, nv, ntb);
  Py_XDECREF(et);
  Py_XDECREF(tb);
}

// Owning reference that releases on scope exit; keeps the error paths short.
struct Ref {
  PyObject* p = nullptr;
  Ref() = default;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
  PyObject* release() {
    PyObject* o = p;
    p = nullptr;
    return o;
  }
  explicit operator bool() const { return p != nullptr; }
};

// Ints, floats, complex numbers and tuples of them hash the same in every
// process, so a sender can pick map keys (or set items) that all share one
// hash; each insert then compares with every earlier one and the decode
// turns quadratic (minutes for a few MB). Distinct keys of real data almost
// never share a full hash (ints below 2^61 never do), so more than
// kMaxSameHash keys with one hash in one map or set is refused. str and bytes
// keys are exempt: their hashes are randomised per process.
class HashGuard {
 public:
  static constexpr uint32_t kMaxSameHash = 64;
  // false: too many keys share `key`'s hash.
  bool admit(PyObject* key) {
    if (PyUnicode_CheckExact(key) || PyBytes_CheckExact(key)) return true;
    Py_hash_t h = PyObject_Hash(key);
    if (h == -1 && PyErr_Occurred()) {
      PyErr_Clear();  // unhashable: the insert that follows reports it
      return true;
    }
    return ++counts_[h] <= kMaxSameHash;
  }

 private:
  std::unordered_map<Py_hash_t, uint32_t> counts_;
};

class Decoder {
 public:
  Decoder(const uint8_t* data, size_t len, const DecodeOptions& opts, size_t base)
      : start_(data), p_(data), end_(data + len), opts_(opts), base_(base) {}

  PyObject* run() {
    PyObject* o = dec(0);
    if (o && p_ != end_) {
      Py_DECREF(o);
      return fail("%zu trailing bytes after the value", size_t(end_ - p_));
    }
    return o;
  }

 private:
  // ---- the one bounds-checked read primitive -----------------------------
  // Every read of n bytes goes through take(): it fails instead of reading
  // past the end, so no length field is trusted before its bytes exist.
  FB_INLINE const uint8_t* take(size_t n) {
    if (FB_LIKELY(size_t(end_ - p_) >= n)) {
      const uint8_t* q = p_;
      p_ += n;
      return q;
    }
    fail("truncated input: %zu bytes needed, %zu left", n, size_t(end_ - p_));
    return nullptr;
  }
  size_t left() const { return size_t(end_ - p_); }

  PyObject* fail(const char* fmt, ...) {
    if (PyErr_Occurred() && PyErr_ExceptionMatches(g_decode_error)) return nullptr;  // innermost error wins
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t off = base_ + size_t(p_ - start_);
    if (PyErr_Occurred()) {
      // A Python-level failure (a class that refused its fields, bad UTF-8).
      std::string prefix = "at offset " + std::to_string(off) + ": " + msg;
      raise_decode_error_from_pending(prefix.c_str());
    } else {
      PyErr_Format(g_decode_error, "at offset %zu: %s", off, msg);
    }
    return nullptr;
  }

  // ---- scalars ----------------------------------------------------------
  FB_INLINE bool read_len(uint8_t width, size_t* n) {
    const uint8_t* q = take(width);
    if (!q) return false;
    *n = width == 1 ? q[0] : width == 2 ? load_be16(q) : load_be32(q);
    return true;
  }

  PyObject* str(size_t n) {
    const uint8_t* q = take(n);
    if (!q) return nullptr;
    PyObject* s = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(q), Py_ssize_t(n), "strict");
    if (!s) {
      p_ = q;
      return fail("invalid UTF-8 in a str of %zu bytes", n);
    }
    return s;
  }

  PyObject* bin(size_t n) {
    const uint8_t* q = take(n);
    return q ? PyBytes_FromStringAndSize(reinterpret_cast<const char*>(q), Py_ssize_t(n)) : nullptr;
  }

  // ---- containers -------------------------------------------------------
  PyObject* array(size_t n, int depth) {
    if (n > left()) return fail("array of %zu items in %zu bytes", n, left());  // each item is >= 1 byte
    if (depth >= kMaxDepth) return fail("nesting deeper than %d levels", kMaxDepth);
    Ref list(PyList_New(Py_ssize_t(n)));
    if (!list) return nullptr;
    for (size_t i = 0; i < n; ++i) {
      PyObject* item = dec(depth + 1);
      if (!item) return nullptr;
      PyList_SET_ITEM(list.p, i, item);
    }
    return list.release();
  }

  PyObject* tuple(size_t n, int depth) {
    if (n > left()) return fail("array of %zu items in %zu bytes", n, left());
    if (depth >= kMaxDepth) return fail("nesting deeper than %d levels", kMaxDepth);
    Ref t(PyTuple_New(Py_ssize_t(n)));
    if (!t) return nullptr;
    for (size_t i = 0; i < n; ++i) {
      PyObject* item = dec(depth + 1);
      if (!item) return nullptr;
      PyTuple_SET_ITEM(t.p, i, item);
    }
    return t.release();
  }

  PyObject* map(size_t n, int depth) {
    if (n > left() / 2) return fail("map of %zu pairs in %zu bytes", n, left());
    if (depth >= kMaxDepth) return fail("nesting deeper than %d levels", kMaxDepth);
    Ref d(_PyDict_NewPresized(Py_ssize_t(n)));
    if (!d) return nullptr;
    HashGuard guard;
    for (size_t i = 0; i < n; ++i) {
      Ref k(dec(depth + 1));
      if (!k) return nullptr;
      if (!guard.admit(k.p)) return fail("more than %u map keys share one hash (a hash-flooding input)", HashGuard::kMaxSameHash);
      Ref v(dec(depth + 1));
      if (!v) return nullptr;
      if (PyDict_SetItem(d.p, k.p, v.p) < 0) return fail("map key of type %s is not hashable", Py_TYPE(k.p)->tp_name);
    }
    return d.release();
  }

  // Reads an array header (the payload of TUPLE/SET/ENUM/OBJECT exts).
  bool array_header(size_t* n) {
    const uint8_t* q = take(1);
    if (!q) return false;
    uint8_t c = *q;
    if ((c & 0xf0) == FIXARRAY) {
      *n = c & 0x0f;
      return true;
    }
    if (c == ARRAY16) return read_len(2, n);
    if (c == ARRAY32) return read_len(4, n);
    p_ = q;
    fail("expected an array, found type byte 0x%02x", c);
    return false;
  }

  // ---- ext ----------------------------------------------------------------
  PyObject* ext(size_t n, int depth) {
    const uint8_t* t = take(1);
    if (!t) return nullptr;
    int8_t type = int8_t(*t);
    if (n > left()) return fail("ext of %zu bytes, %zu left", n, left());
    // Decode the payload as a sub-range so nothing inside can read past it.
    const uint8_t* saved_end = end_;
    const uint8_t* payload_end = p_ + n;
    end_ = payload_end;
    PyObject* o = ext_payload(type, n, depth);
    end_ = saved_end;
    if (o && p_ != payload_end) {
      Py_DECREF(o);
      return fail("ext %d payload has %zu unread bytes", int(type), size_t(payload_end - p_));
    }
    return o;
  }

  PyObject* ext_payload(int8_t type, size_t n, int depth) {
    switch (type) {
      case EXT_TUPLE: {
        size_t k;
        return array_header(&k) ? tuple(k, depth) : nullptr;
      }
      case EXT_SET:
      case EXT_FROZENSET:
        return set(type == EXT_FROZENSET, depth);
      case EXT_BIGINT: {
        if (n == 0) return fail("empty big int");
        const uint8_t* q = take(n);
        return _PyLong_FromByteArray(q, n, /*little_endian=*/1, /*is_signed=*/1);
      }
      case EXT_COMPLEX: {
        if (n != 16) return fail("complex payload of %zu bytes (16 expected)", n);
        const uint8_t* q = take(16);
        return PyComplex_FromDoubles(load_le<double>(q), load_le<double>(q + 8));
      }
      case EXT_INT_BLOCK:
        return int_block(n);
      case EXT_TENSOR:
      case EXT_CUDA_REF:
        return tensor(type == EXT_CUDA_REF);
      case EXT_NDARRAY:
        return ndarray();
      case EXT_ENUM:
      case EXT_OBJECT:
        return object(type == EXT_ENUM, depth);
      case EXT_PYARRAY:
        return pyarray(n);
      case EXT_BYTEARRAY: {
        const uint8_t* q = take(n);
        return PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(q), Py_ssize_t(n));
      }
      case EXT_MEMORYVIEW: {
        Ref b(bin(n));
        return b ? PyMemoryView_FromObject(b.p) : nullptr;
      }
      case EXT_PICKLE:
        return pickle(n);
      default:
        p_ -= 1;
        return fail("unknown ext type %d", int(type));
    }
  }

  PyObject* set(bool frozen, int depth) {
    size_t k;
    if (!array_header(&k)) return nullptr;
    if (k > left()) return fail("set of %zu items in %zu bytes", k, left());
    if (depth >= kMaxDepth) return fail("nesting deeper than %d levels", kMaxDepth);
    Ref s(frozen ? PyFrozenSet_New(nullptr) : PySet_New(nullptr));
    if (!s) return nullptr;
    HashGuard guard;
    for (size_t i = 0; i < k; ++i) {
      Ref item(dec(depth + 1));
      if (!item) return nullptr;
      if (!guard.admit(item.p)) return fail("more than %u set items share one hash (a hash-flooding input)", HashGuard::kMaxSameHash);
      if (PySet_Add(s.p, item.p) < 0) return fail("set item of type %s is not hashable", Py_TYPE(item.p)->tp_name);
    }
    return s.release();
  }

  PyObject* int_block(size_t n) {
    const uint8_t* w = take(1);
    if (!w) return nullptr;
    if (*w > W_U64) return fail("unknown int block width code %u", unsigned(*w));
    size_t wb = kIntWidthBytes[*w];
    if ((n - 1) % wb) return fail("int block of %zu bytes is not a whole number of %zu-byte items", n - 1, wb);
    size_t count = (n - 1) / wb;
    const uint8_t* q = take(n - 1);
    if (!q) return nullptr;
    Ref list(PyList_New(Py_ssize_t(count)));
    if (!list) return nullptr;
    PyObject** items = reinterpret_cast<PyListObject*>(list.p)->ob_item;
    // One tight loop per width: no per-element dispatch.
    switch (IntWidth(*w)) {
      case W_U8:
        for (size_t i = 0; i < count; ++i) items[i] = make_int(q[i]);
        break;
      case W_U16:
        for (size_t i = 0; i < count; ++i) {
          if (i + 16 < count) prefetch_int(load_le<uint16_t>(q + 2 * (i + 16)));
          items[i] = make_int(load_le<uint16_t>(q + 2 * i));
        }
        break;
      case W_U32:
        // Token ids: random values, so each shared int is a cache miss; load
        // them a few elements ahead.
        for (size_t i = 0; i < count; ++i) {
          if (i + 16 < count) prefetch_int(load_le<uint32_t>(q + 4 * (i + 16)));
          items[i] = make_int(load_le<uint32_t>(q + 4 * i));
        }
        break;
      case W_I32:
        for (size_t i = 0; i < count; ++i) items[i] = make_int(load_le<int32_t>(q + 4 * i));
        break;
      case W_I64:
        for (size_t i = 0; i < count; ++i) items[i] = make_int(load_le<int64_t>(q + 8 * i));
        break;
      case W_U64:
        for (size_t i = 0; i < count; ++i) items[i] = PyLong_FromUnsignedLongLong(load_le<uint64_t>(q + 8 * i));
        break;
    }
    for (size_t i = 0; i < count; ++i)
      if (!items[i]) return fail("out of memory building an int list");
    // A list holding only ints cannot be part of a reference cycle, so the
    // cyclic GC need not walk its elements: for a rollout batch that walk
    // (millions of token ids, on every young-generation collection after the
    // decode) cost more than the decode itself. CPython untracks tuples of
    // atomic values for the same reason. The one caveat (FORMAT.md): a
    // cycle built later through such a list by storing containers in it is
    // not collected.
    PyObject_GC_UnTrack(list.p);
    return list.release();
  }

  // dtype code, ndim, shape; checks the element count cannot overflow.
  bool tensor_header(at::ScalarType* dtype, std::vector<int64_t>* shape, uint64_t* nbytes) {
    const uint8_t* h = take(2);
    if (!h) return false;
    auto dt = dtype_from_code(h[0]);
    if (!dt) {
      fail("unknown tensor dtype code %u", unsigned(h[0]));
      return false;
    }
    *dtype = *dt;
    size_t ndim = h[1];
    const uint8_t* s = take(8 * ndim);
    if (!s) return false;
    uint64_t numel = 1;
    bool zero = false;
    for (size_t d = 0; d < ndim; ++d) {
      int64_t v = load_le<int64_t>(s + 8 * d);
      if (v < 0) {
        fail("negative tensor dimension %lld", (long long)v);
        return false;
      }
      shape->push_back(v);
      if (v == 0) zero = true;
      else if (!zero && __builtin_mul_overflow(numel, uint64_t(v), &numel)) {
        fail("tensor shape overflows");
        return false;
      }
    }
    if (zero) numel = 0;
    if (__builtin_mul_overflow(numel, uint64_t(c10::elementSize(*dtype)), nbytes)) {
      fail("tensor shape overflows");
      return false;
    }
    return true;
  }

  // A bool is one byte that must be 0 or 1; anything else is undefined
  // behaviour for torch and numpy alike.
  static bool bool_bytes(const uint8_t* q, size_t n) {
    uint8_t acc = 0;
    for (size_t i = 0; i < n; ++i) acc |= q[i];
    return acc <= 1;
  }

  PyObject* tensor(bool cuda) {
    at::ScalarType dtype;
    std::vector<int64_t> shape;
    uint64_t nbytes;
    if (!tensor_header(&dtype, &shape, &nbytes)) return nullptr;
    try {
      if (cuda) {
        const uint8_t* q = take(8);
        if (!q) return nullptr;
        uint64_t off = load_le<uint64_t>(q);
        if (!opts_.device_buffer) return fail("CUDA tensor reference outside a broadcast");
        const at::Tensor& buf = *opts_.device_buffer;
        if (off > uint64_t(buf.numel()) || nbytes > uint64_t(buf.numel()) - off || off % c10::elementSize(dtype))
          return fail("CUDA tensor reference [%llu, +%llu) outside the %lld-byte device buffer",
                      (unsigned long long)off, (unsigned long long)nbytes, (long long)buf.numel());
        at::Tensor t = buf.narrow(0, int64_t(off), int64_t(nbytes)).view(dtype).view(shape);
        return wrap_tensor(std::move(t));
      }
      if (nbytes != left()) return fail("tensor data of %zu bytes, %llu expected", left(), (unsigned long long)nbytes);
      const uint8_t* q = take(nbytes);
      if (dtype == at::kBool && !bool_bytes(q, nbytes)) return fail("bool tensor holds bytes other than 0 and 1");
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
      if (nbytes) std::memcpy(t.data_ptr(), q, nbytes);
      return wrap_tensor(std::move(t));
    } catch (const c10::Error& e) {
      return fail("cannot build tensor: %s", e.what_without_backtrace());
    }
  }

  PyObject* ndarray() {
    const uint8_t* ln = take(1);
    if (!ln) return nullptr;
    const uint8_t* ds = take(*ln);
    const uint8_t* nd = ds ? take(1) : nullptr;
    const uint8_t* sh = nd ? take(8 * size_t(*nd)) : nullptr;
    if (!sh) return nullptr;
    Ref np(PyImport_ImportModule("numpy"));
    if (!np) return fail("a numpy.ndarray arrived but numpy is not installed");
    Ref dtype(PyObject_CallMethod(np.p, "dtype", "s#", reinterpret_cast<const char*>(ds), Py_ssize_t(*ln)));
    if (!dtype) return fail("bad numpy dtype");
    Ref kind(PyObject_GetAttrString(dtype.p, "kind"));
    Ref itemsize(kind ? PyObject_GetAttrString(dtype.p, "itemsize") : nullptr);
    const char* k = itemsize ? PyUnicode_AsUTF8(kind.p) : nullptr;
    if (!k || !k[0] || !std::strchr("biufc", k[0])) return fail("numpy dtype kind not allowed");
    uint64_t count = 1;
    Ref shape(PyTuple_New(*nd));
    if (!shape) return nullptr;
    bool zero = false;
    for (size_t d = 0; d < *nd; ++d) {
      int64_t v = load_le<int64_t>(sh + 8 * d);
      if (v < 0) return fail("negative array dimension");
      if (v == 0) zero = true;
      else if (!zero && __builtin_mul_overflow(count, uint64_t(v), &count)) return fail("array shape overflows");
      PyTuple_SET_ITEM(shape.p, d, PyLong_FromLongLong(v));
    }
    if (zero) count = 0;
    uint64_t nbytes;
    if (__builtin_mul_overflow(count, uint64_t(PyLong_AsUnsignedLongLong(itemsize.p)), &nbytes) || nbytes != left())
      return fail("array data of %zu bytes does not match its shape", left());
    const uint8_t* q = take(nbytes);
    if (k[0] == 'b' && !bool_bytes(q, nbytes)) return fail("bool array holds bytes other than 0 and 1");
    Ref raw(PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(q), Py_ssize_t(nbytes)));
    if (!raw) return nullptr;
    Ref flat(PyObject_CallMethod(np.p, "frombuffer", "OO", raw.p, dtype.p));
    if (!flat) return fail("cannot build numpy array");
    PyObject* out = PyObject_CallMethod(flat.p, "reshape", "(O)", shape.p);
    return out ? out : fail("cannot reshape numpy array");
  }

  PyObject* pyarray(size_t n) {
    if (n < 1) return fail("empty array.array payload");
    const uint8_t* tc = take(1);
    if (!std::strchr("bBuhHiIlLqQfdw", int(*tc)) || *tc == 0) return fail("bad array.array typecode");
    const uint8_t* q = take(n - 1);
    Ref mod(PyImport_ImportModule("array"));
    if (!mod) return nullptr;
    Ref raw(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(q), Py_ssize_t(n - 1)));
    if (!raw) return nullptr;
    PyObject* out = PyObject_CallMethod(mod.p, "array", "CO", int(*tc), raw.p);
    return out ? out : fail("cannot build array.array");
  }

  PyObject* pickle(size_t n) {
    if (!opts_.allow_pickle)
      return fail("refusing a pickled object: pickles can run code; decode with allow_pickle=True only if you "
                  "trust the sender");
    Ref raw(bin(n));
    if (!raw) return nullptr;
    Ref mod(PyImport_ImportModule("pickle"));
    if (!mod) return nullptr;
    PyObject* out = PyObject_CallMethod(mod.p, "loads", "O", raw.p);
    return out ? out : fail("unpickling failed");
  }

  PyObject* object(bool is_enum, int depth) {
    size_t k;
    if (!array_header(&k)) return nullptr;
    if (k != 2) return fail("%s payload must be a 2-item array", is_enum ? "enum" : "object");
    if (depth >= kMaxDepth) return fail("nesting deeper than %d levels", kMaxDepth);
    const uint8_t* name_at = p_;
    Ref name(dec(depth + 1));
    if (!name) return nullptr;
    if (!PyUnicode_Check(name.p)) return fail("class name is not a str");
    const TypeInfo* info = TypeRegistry::instance().for_decode(name.p, opts_.trusted);
    if (!info) {
      p_ = name_at;
      if (PyErr_Occurred()) return fail("cannot resolve class");
      return fail("class %s is not trusted: it is neither registered (fastbcast.register(cls) on every receiving "
                  "rank) nor in an already-imported module under a trusted prefix (decode(trusted=...) / "
                  "fastbcast.trust(); decoding never imports)", PyUnicode_AsUTF8(name.p));
    }
    if ((info->kind == Kind::ENUM) != is_enum) return fail("class %s has the wrong kind", PyUnicode_AsUTF8(name.p));
    if (is_enum) {
      Ref value(dec(depth + 1));
      if (!value) return nullptr;
      PyObject* out = PyObject_CallOneArg(info->cls, value.p);  // EnumMeta.__call__: a member lookup
      return out ? out : fail("no member of %s has this value", PyUnicode_AsUTF8(name.p));
    }
    // The field map is part of the object, not a level of its own: the
    // encoder counts the values one level below the object, and so do we.
    const uint8_t* fields_at = p_;
    Ref fields(dec(depth));
    if (!fields) return nullptr;
    if (!PyDict_CheckExact(fields.p)) return fail("object fields are not a map");
    // Refuse fields the class does not declare: they could only be set by
    // bypassing the class's own definition.
    Py_ssize_t pos = 0;
    PyObject *key, *val;
    while (PyDict_Next(fields.p, &pos, &key, &val)) {
      int r = PyUnicode_Check(key) ? PySequence_Contains(info->fields, key) : 0;
      if (r != 1) {
        p_ = fields_at;
        return fail("%s has no field %s", PyUnicode_AsUTF8(name.p),
                    PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : "(non-str key)");
      }
    }
    if (info->kind == Kind::DATACLASS && PyDict_GET_SIZE(fields.p) != PyTuple_GET_SIZE(info->fields)) {
      p_ = fields_at;
      return fail("%s needs all of its %zd fields, got %zd", PyUnicode_AsUTF8(name.p),
                  PyTuple_GET_SIZE(info->fields), PyDict_GET_SIZE(fields.p));
    }
    PyObject* out = nullptr;
    switch (info->kind) {
      case Kind::DATACLASS: {
        // object.__new__ + object.__setattr__: no __init__/__post_init__ runs
        // and frozen dataclasses are filled the same way.
        Ref empty(PyTuple_New(0));
        Ref obj(PyBaseObject_Type.tp_new(reinterpret_cast<PyTypeObject*>(info->cls), empty.p, nullptr));
        if (!obj) break;
        pos = 0;
        bool ok = true;
        while (ok && PyDict_Next(fields.p, &pos, &key, &val)) ok = PyObject_GenericSetAttr(obj.p, key, val) == 0;
        if (ok) out = obj.release();
        break;
      }
      case Kind::PYDANTIC: {
        Ref ctor(PyObject_GetAttrString(info->cls, "model_construct"));
        Ref empty(ctor ? PyTuple_New(0) : nullptr);
        if (empty) out = PyObject_Call(ctor.p, empty.p, fields.p);
        break;
      }
      case Kind::STRUCT: {
        Ref empty(PyTuple_New(0));
        if (empty) out = PyObject_Call(info->cls, empty.p, fields.p);
        break;
      }
      default:
        break;
    }
    return out ? out : fail("cannot rebuild %s", PyUnicode_AsUTF8(name.p));
  }

  // ---- dispatch ---------------------------------------------------------
  PyObject* dec(int depth) {
    const uint8_t* q = take(1);
    if (!q) return nullptr;
    uint8_t c = *q;
    if (c <= POSFIXINT_MAX) return make_int(c);
    if (c >= NEGFIXINT) return PyLong_FromLong(int8_t(c));
    if ((c & 0xe0) == FIXSTR) return str(c & 0x1f);
    if ((c & 0xf0) == FIXARRAY) return array(c & 0x0f, depth);
    if ((c & 0xf0) == FIXMAP) return map(c & 0x0f, depth);
    size_t n;
    const uint8_t* v;
    switch (c) {
      case NIL: Py_RETURN_NONE;
      case FALSE_: Py_RETURN_FALSE;
      case TRUE_: Py_RETURN_TRUE;
      case UINT8: return (v = take(1)) ? make_int(v[0]) : nullptr;
      case UINT16: return (v = take(2)) ? make_int(load_be16(v)) : nullptr;
      case UINT32: return (v = take(4)) ? make_int(load_be32(v)) : nullptr;
      case UINT64: return (v = take(8)) ? PyLong_FromUnsignedLongLong(load_be64(v)) : nullptr;
      case INT8: return (v = take(1)) ? PyLong_FromLong(int8_t(v[0])) : nullptr;
      case INT16: return (v = take(2)) ? make_int(int16_t(load_be16(v))) : nullptr;
      case INT32: return (v = take(4)) ? make_int(int32_t(load_be32(v))) : nullptr;
      case INT64: return (v = take(8)) ? make_int(int64_t(load_be64(v))) : nullptr;
      case FLOAT32: {
        if (!(v = take(4))) return nullptr;
        uint32_t bits = load_be32(v);
        float f;
        std::memcpy(&f, &bits, 4);
        return PyFloat_FromDouble(f);
      }
      case FLOAT64: {
        if (!(v = take(8))) return nullptr;
        uint64_t bits = load_be64(v);
        double d;
        std::memcpy(&d, &bits, 8);
        return PyFloat_FromDouble(d);
      }
      case STR8: return read_len(1, &n) ? str(n) : nullptr;
      case STR16: return read_len(2, &n) ? str(n) : nullptr;
      case STR32: return read_len(4, &n) ? str(n) : nullptr;
      case BIN8: return read_len(1, &n) ? bin(n) : nullptr;
      case BIN16: return read_len(2, &n) ? bin(n) : nullptr;
      case BIN32: return read_len(4, &n) ? bin(n) : nullptr;
      case ARRAY16: return read_len(2, &n) ? array(n, depth) : nullptr;
      case ARRAY32: return read_len(4, &n) ? array(n, depth) : nullptr;
      case MAP16: return read_len(2, &n) ? map(n, depth) : nullptr;
      case MAP32: return read_len(4, &n) ? map(n, depth) : nullptr;
      case FIXEXT1: return ext(1, depth);
      case FIXEXT2: return ext(2, depth);
      case FIXEXT4: return ext(4, depth);
      case FIXEXT8: return ext(8, depth);
      case FIXEXT16: return ext(16, depth);
      case EXT8: return read_len(1, &n) ? ext(n, depth) : nullptr;
      case EXT16: return read_len(2, &n) ? ext(n, depth) : nullptr;
      case EXT32: return read_len(4, &n) ? ext(n, depth) : nullptr;
      default:
        p_ = q;
        return fail("invalid type byte 0x%02x", c);
    }
  }

  const uint8_t* start_;
  const uint8_t* p_;
  const uint8_t* end_;
  const DecodeOptions& opts_;
  size_t base_;
};

}  // namespace

PyObject* decode_error_type() { return g_decode_error; }
void set_decode_error_type(PyObject* cls) {
  Py_XINCREF(cls);
  g_decode_error = cls;
}

PyObject* decode_object(const uint8_t* data, size_t len, const DecodeOptions& opts, size_t base_offset) {
  FB_ASSERT(g_decode_error, "DecodeError not initialised");
  Decoder d(data, len, opts, base_offset);
  // A decode allocates thousands of lists and dicts at once. With the cyclic
  // GC enabled, each 700 of them trigger a collection that walks every
  // young container and every element in it (millions of token ids), which
  // tripled decode time in measurements. Nothing a decode builds can form a
  // cycle, so collections are deferred until it returns.
  int gc_was_enabled = PyGC_Disable();
  PyObject* o = d.run();
  if (gc_was_enabled) PyGC_Enable();
  if (!o && PyErr_Occurred() && !PyErr_ExceptionMatches(g_decode_error)) {
    // Anything else that escaped (MemoryError, a failing Python call) is
    // still reported as a DecodeError.
    raise_decode_error_from_pending("decoding failed");
  }
  return o;
}

}  // namespace fastbcast
