#include "decoder.h"

#include <cstdarg>
#include <cstring>
#include <string>
#include <deque>
#include <memory>
#include <unordered_map>

#include "exception.h"
#include "int_cache.h"
#include "stack_guard.h"
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
      // Unhashable: the insert that follows reports it. A KeyboardInterrupt
      // from a __hash__ stays pending and fails the decode.
      return clear_unless_fatal();
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
  ~Decoder() {
    for (PyObject* o : memo_) Py_XDECREF(o);
    for (auto& e : table_) Py_DECREF(e.cls);
  }

  PyObject* run() {
    PyObject* o = dec(0);
    if (o && p_ != end_) {
      Py_DECREF(o);
      return fail("%zu trailing bytes after the value", size_t(end_ - p_));
    }
    return o;
  }

  // ---- one decoder, many inputs (DecoderSession) ------------------------
  void rebase(const uint8_t* data, size_t len, size_t base) {
    start_ = p_ = data;
    end_ = data + len;
    base_ = base;
  }
  // One item of a top-level container, at the depth array() gives it.
  PyObject* top_value() { return dec(1); }
  size_t remaining() const { return size_t(end_ - p_); }
  PyObject* trailing() { return fail("%zu trailing bytes after the segment's values", left()); }
  bool admit_top_key(PyObject* k) {
    if (top_guard_.admit(k)) return true;
    fail("more than %u map keys share one hash (a hash-flooding input)", HashGuard::kMaxSameHash);
    return false;
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
    if (pending_is_fatal()) return nullptr;  // KeyboardInterrupt, SystemExit: unchanged
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

  // A bin value: long ones take a memo slot, as the encoder gave them one.
  PyObject* bin_value(size_t n) {
    PyObject* b = bin(n);
    return n >= kMemoBytesMin ? shared(b) : b;
  }

  // ---- containers -------------------------------------------------------
  // Every recursive step (container, instance) passes here first.
  bool too_deep(int depth) {
    if (FB_LIKELY(depth < kMaxDepth && guard_.ok())) return false;
    if (depth >= kMaxDepth) fail("nesting deeper than %d levels", kMaxDepth);
    else fail("nesting too deep for this thread's C stack (%d levels)", depth);
    return true;
  }

  PyObject* array(size_t n, int depth) {
    if (n > left()) return fail("array of %zu items in %zu bytes", n, left());  // each item is >= 1 byte
    if (too_deep(depth)) return nullptr;
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
    if (too_deep(depth)) return nullptr;
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
    if (too_deep(depth)) return nullptr;
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
        return shared(tensor(type == EXT_CUDA_REF));
      case EXT_NDARRAY:
        return shared(ndarray());
      case EXT_OBJECT_DEF:
      case EXT_OBJECT:
        return instance(type == EXT_OBJECT_DEF, depth);
      case EXT_REF:
        return ref();
      case EXT_SURROGATE_STR:
        return surrogate_str(n);
      case EXT_NPSCALAR:
        return npscalar();
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
    if (too_deep(depth)) return nullptr;
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

  // numpy and the dtype spelled by `n` bytes at `ds`, if it is of a kind the
  // codec carries (b, i, u, f, c: plain bytes, no objects).
  bool numeric_dtype(const uint8_t* ds, size_t n, const char* what, Ref* np, Ref* dtype, char* kind, size_t* isz) {
    np->p = PyImport_ImportModule("numpy");
    if (!np->p) return fail("a %s arrived but numpy is not installed", what), false;
    dtype->p = PyObject_CallMethod(np->p, "dtype", "s#", reinterpret_cast<const char*>(ds), Py_ssize_t(n));
    if (!dtype->p) return fail("bad numpy dtype"), false;
    Ref k(PyObject_GetAttrString(dtype->p, "kind"));
    Ref itemsize(k ? PyObject_GetAttrString(dtype->p, "itemsize") : nullptr);
    const char* s = itemsize ? utf8_or(k.p, "") : "";
    if (!s[0] || !std::strchr("biufc", s[0])) return fail("numpy dtype kind not allowed"), false;
    *kind = s[0];
    *isz = PyLong_AsSize_t(itemsize.p);
    return true;
  }

  PyObject* ndarray() {
    const uint8_t* ln = take(1);
    if (!ln) return nullptr;
    const uint8_t* ds = take(*ln);
    const uint8_t* nd = ds ? take(1) : nullptr;
    const uint8_t* sh = nd ? take(8 * size_t(*nd)) : nullptr;
    if (!sh) return nullptr;
    Ref np, dtype;
    char kind;
    size_t isz;
    if (!numeric_dtype(ds, *ln, "numpy.ndarray", &np, &dtype, &kind, &isz)) return nullptr;
    const char k[2] = {kind, 0};
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
    if (__builtin_mul_overflow(count, uint64_t(isz), &nbytes) || nbytes != left())
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
    if (n < 2) return fail("array.array payload of %zu bytes", n);
    const uint8_t* h = take(2);
    char tc = char(h[0]);
    uint8_t w = h[1];
    if (!tc || !std::strchr("bBuhHiIlLqQfdw", tc)) return fail("bad array.array typecode");
    // The stdlib array type, looked up once: an import per array was a
    // visible share of decoding SGLang's requests (one array each).
    static PyObject* array_type = nullptr;
    if (!array_type) {
      Ref mod(PyImport_ImportModule("array"));
      array_type = mod ? PyObject_GetAttrString(mod.p, "array") : nullptr;
      if (!array_type) return fail("cannot load the array module");
    }
    Ref empty(PyObject_CallFunction(array_type, "C", int(tc)));
    Ref isz_o(empty ? PyObject_GetAttrString(empty.p, "itemsize") : nullptr);
    if (!isz_o) return fail("array.array typecode %c is not available here", tc);
    size_t isz = PyLong_AsSize_t(isz_o.p);
    size_t body = n - 2;
    const uint8_t* q = take(body);
    if (w == kRawWidth) {
      if (body % isz) return fail("array.array of %zu bytes is not a whole number of %zu-byte items", body, isz);
      Ref raw(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(q), Py_ssize_t(body)));
      Ref r(raw ? PyObject_CallMethod(empty.p, "frombytes", "O", raw.p) : nullptr);
      return r ? empty.release() : fail("cannot build array.array");
    }
    bool is_signed = std::strchr("bhilq", tc) != nullptr;
    if (w > W_U64 || !(is_signed || std::strchr("BHILQ", tc))) return fail("bad array.array width code %u", unsigned(w));
    size_t wb = kIntWidthBytes[w];
    if (body % wb) return fail("array.array of %zu bytes is not a whole number of %zu-byte items", body, wb);
    size_t count = body / wb;
    if (count > (size_t(PY_SSIZE_T_MAX) / isz)) return fail("array.array too long");
    // Widen into the typecode's own item size, refusing values it cannot hold.
    Ref raw(PyBytes_FromStringAndSize(nullptr, Py_ssize_t(count * isz)));
    if (!raw) return nullptr;
    uint8_t* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(raw.p));
    int bits = int(isz * 8);
    for (size_t i = 0; i < count; ++i) {
      const uint8_t* x = q + i * wb;
      int64_t sv;
      uint64_t uv;
      bool neg = false;
      switch (IntWidth(w)) {
        case W_U8: uv = x[0]; break;
        case W_U16: uv = load_le<uint16_t>(x); break;
        case W_U32: uv = load_le<uint32_t>(x); break;
        case W_I32: sv = load_le<int32_t>(x); neg = sv < 0; uv = uint64_t(sv); break;
        case W_I64: sv = load_le<int64_t>(x); neg = sv < 0; uv = uint64_t(sv); break;
        default: uv = load_le<uint64_t>(x);
      }
      bool fits = is_signed ? (neg ? (bits == 64 || int64_t(uv) >= -(int64_t(1) << (bits - 1)))
                                   : (w != W_U64 && (bits == 64 ? uv <= uint64_t(INT64_MAX) : uv < (uint64_t(1) << (bits - 1)))))
                            : (!neg && (bits == 64 || uv < (uint64_t(1) << bits)));
      if (!fits) return fail("array.array('%c') item %zu out of range", tc, i);
      std::memcpy(dst + i * isz, &uv, isz);  // little-endian: the low bytes
    }
    Ref r(PyObject_CallMethod(empty.p, "frombytes", "O", raw.p));
    return r ? empty.release() : fail("cannot build array.array");
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

  // ---- class instances, shared references --------------------------------
  struct Entry {
    PyObject* cls;                         // strong; WK_CALL: the rebuild callable
    TypeInfo* info;                        // NULL for WK_CALL
    uint8_t kind;                          // WireKind
    std::shared_ptr<const Layout> layout;  // attribute names (and STRUCT slots)
  };

  // A msgpack unsigned int (class table and memo indices, flags).
  bool read_uint(uint64_t* v) {
    const uint8_t* q = take(1);
    if (!q) return false;
    uint8_t c = *q;
    const uint8_t* x;
    if (c <= POSFIXINT_MAX) *v = c;
    else if (c == UINT8 && (x = take(1))) *v = x[0];
    else if (c == UINT16 && (x = take(2))) *v = load_be16(x);
    else if (c == UINT32 && (x = take(4))) *v = load_be32(x);
    else if (c == UINT64 && (x = take(8))) *v = load_be64(x);
    else {
      if (!PyErr_Occurred()) {
        p_ = q;
        fail("expected an unsigned int, found type byte 0x%02x", c);
      }
      return false;
    }
    return true;
  }

  // An EXT_ABSENT marker is next: consume it.
  bool absent() {
    if (left() >= 3 && p_[0] == EXT8 && p_[1] == 0 && int8_t(p_[2]) == EXT_ABSENT) {
      p_ += 3;
      return true;
    }
    return false;
  }

  PyObject* ref() {
    uint64_t i;
    if (!read_uint(&i)) return nullptr;
    if (i >= memo_.size()) return fail("reference to object %llu of %zu", (unsigned long long)i, memo_.size());
    if (!memo_[i]) return fail("reference to object %llu while it is being rebuilt from its arguments",
                               (unsigned long long)i);
    Py_INCREF(memo_[i]);
    return memo_[i];
  }

  bool remember(PyObject* o) {
    Py_XINCREF(o);
    memo_.push_back(o);
    return o != nullptr;
  }

  // A memoised leaf (tensor, array, long bytes) takes the next memo slot.
  PyObject* shared(PyObject* o) {
    if (o) remember(o);
    return o;
  }

  // A str's raw UTF-8 (class names and layouts are resolved from the bytes).
  bool raw_str(const char** s, size_t* n) {
    const uint8_t* q = take(1);
    if (!q) return false;
    uint8_t c = *q;
    if ((c & 0xe0) == FIXSTR) *n = c & 0x1f;
    else if (c == STR8 ? !read_len(1, n) : c == STR16 ? !read_len(2, n) : c == STR32 ? !read_len(4, n) : true) {
      if (!PyErr_Occurred()) {
        p_ = q;
        fail("expected a str, found type byte 0x%02x", c);
      }
      return false;
    }
    *s = reinterpret_cast<const char*>(take(*n));
    return *s != nullptr;
  }

  // [name, kind, [attribute names]]: resolves the class and its layout.
  bool class_def() {
    size_t k;
    if (!array_header(&k)) return false;
    if (k != 3) return fail("class table entry must be a 3-item array"), false;
    const uint8_t* name_at = p_;
    const char* name;
    size_t name_len;
    if (!raw_str(&name, &name_len)) return false;
    uint64_t kind;
    if (!read_uint(&kind)) return false;
    if (kind < WK_STRUCT || kind > WK_TENSOR) return fail("unknown class kind %llu", (unsigned long long)kind), false;
    // The layout's extent, read without building anything: most messages
    // repeat the previous one's layout byte for byte.
    const uint8_t* layout_at = p_;
    size_t nf;
    if (!array_header(&nf)) return false;
    if (nf > kMaxLayout || nf > left()) return fail("class layout of %zu names", nf), false;
    const uint8_t* names_at = p_;
    for (size_t i = 0; i < nf; ++i) {
      const char* s;
      size_t n;
      if (!raw_str(&s, &n)) return false;
    }
    std::string key(1, char(kind));
    key.append(reinterpret_cast<const char*>(layout_at), size_t(p_ - layout_at));
    if (kind == WK_CALL) return call_def(name, name_len, name_at, nf);

    TypeInfo* info = TypeRegistry::instance().for_decode(name, name_len, opts_.trusted);
    if (!info) {
      p_ = name_at;
      if (PyErr_Occurred()) return fail("cannot resolve class"), false;
      return fail("class %.*s is not trusted: it is neither registered (fastbcast.register(cls) on every receiving "
                  "rank) nor in an already-imported module under a trusted prefix (decode(trusted=...) / "
                  "fastbcast.trust(); decoding never imports)", int(std::min<size_t>(name_len, 200)), name), false;
    }
    static const Kind kFor[] = {Kind::UNSUPPORTED, Kind::STRUCT, Kind::PYDANTIC, Kind::OBJECT,
                                Kind::REDUCE,      Kind::UNSUPPORTED, Kind::UNSUPPORTED, Kind::TENSOR};
    if (kind != WK_CLASS && info->kind != kFor[kind]) {
      p_ = name_at;
      return fail("class %.*s is not rebuilt the way the sender wrote it (kind %u)", int(std::min<size_t>(name_len, 200)),
                  name, unsigned(kind)), false;
    }
    std::shared_ptr<const Layout> layout = info->last_layout;
    if (!layout || layout->key != key) {
      const uint8_t* end = p_;
      p_ = names_at;
      auto fresh = std::make_shared<Layout>();
      if (!read_layout(fresh.get(), nf, info, name, name_len)) return false;
      FB_ASSERT(p_ == end);
      fresh->key = std::move(key);
      layout = fresh;
      info->last_layout = layout;
    }
    Py_INCREF(info->cls);
    table_.push_back(Entry{info->cls, info, uint8_t(kind), std::move(layout)});
    return true;
  }

  // A WK_CALL entry names the callable a __reduce__ rebuilds with. It is
  // called only if registered or under a trusted prefix, and found among
  // loaded modules (never imported).
  bool call_def(const char* name, size_t name_len, const uint8_t* name_at, size_t nf) {
    if (nf) return fail("a callable's class table entry has a layout"), false;
    PyObject* fn = TypeRegistry::instance().callable_for_decode(name, name_len, opts_.trusted);
    if (!fn) {
      p_ = name_at;
      if (PyErr_Occurred()) return fail("cannot resolve callable"), false;
      return fail("callable %.*s is not trusted: it is neither a registered class nor in an already-imported "
                  "module under a trusted prefix (decode(trusted=...) / fastbcast.trust(); decoding never imports)",
                  int(std::min<size_t>(name_len, 200)), name), false;
    }
    table_.push_back(Entry{fn, nullptr, WK_CALL, nullptr});
    return true;
  }

  bool read_layout(Layout* l, size_t nf, TypeInfo* info, const char* name, size_t name_len) {
    for (size_t i = 0; i < nf; ++i) {
      PyObject* s = dec(kMaxDepth - 1);
      if (!s) return false;
      l->names.push_back(s);
      if (!PyUnicode_CheckExact(s)) return fail("class layout name is not a str"), false;
      PyUnicode_InternInPlace(&l->names.back());
    }
    if (l->names.size() && info->kind == Kind::STRUCT) {
      // Map the sender's field order onto this process's slots by name.
      PyObject* mine = info->fields;
      for (PyObject* n : l->names) {
        Py_ssize_t j = 0, m = PyTuple_GET_SIZE(mine);
        while (j < m && PyTuple_GET_ITEM(mine, j) != n) ++j;  // both interned
        if (j == m)
          return fail("%.*s has no field %s", int(std::min<size_t>(name_len, 200)), name, utf8_or(n, "?")), false;
        for (PyMemberDef* d : l->members)
          if (d == info->members[j]) return fail("field %s listed twice", utf8_or(n, "?")), false;
        l->members.push_back(info->members[j]);
      }
    }
    return true;
  }

  // A dict from the layout's values and the map of the other attributes.
  PyObject* attr_dict(const Entry& e, int depth) {
    Ref d(_PyDict_NewPresized(Py_ssize_t(e.layout->names.size())));
    if (!d) return nullptr;
    for (PyObject* n : e.layout->names) {
      if (absent()) continue;
      Ref v(dec(depth + 1));
      if (!v || PyDict_SetItem(d.p, n, v.p) < 0) return nullptr;
    }
    const uint8_t* at = p_;
    Ref rest(dec(depth));  // part of the instance, not a level of its own
    if (!rest) return nullptr;
    if (!PyDict_CheckExact(rest.p)) {
      p_ = at;
      return fail("instance attributes are not a map");
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(rest.p, &pos, &k, &v)) {
      if (!PyUnicode_CheckExact(k)) {
        p_ = at;
        return fail("instance attribute name is not a str");
      }
      Py_INCREF(k);
      PyUnicode_InternInPlace(&k);
      int r = PyDict_SetItem(d.p, k, v);
      Py_DECREF(k);
      if (r < 0) return nullptr;
    }
    return d.release();
  }

  // The names a slot state may set: the class's own __slots__ (what copyreg
  // collects), never a dunder such as __class__.
  bool set_slots_from_map(PyObject* obj, const Entry& e, int depth) {
    const uint8_t* at = p_;
    Ref m(dec(depth));
    if (!m) return false;
    if (m.p == Py_None) return true;
    if (!PyDict_CheckExact(m.p)) {
      p_ = at;
      return fail("slot state is not a map"), false;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(m.p, &pos, &k, &v)) {
      int known = PyUnicode_Check(k) ? PySequence_Contains(e.info->fields, k) : 0;
      if (known != 1) {
        p_ = at;
        return fail("%s is not a slot of %s", PyUnicode_Check(k) ? utf8_or(k, "?") : "(non-str)",
                    utf8_or(e.info->name, "?")), false;
      }
      if (PyObject_SetAttr(obj, k, v) < 0) return fail("cannot restore a slot"), false;
    }
    return true;
  }

  PyObject* instance(bool define, int depth) {
    if (too_deep(depth)) return nullptr;
    uint64_t idx;
    if (define) {
      if (!class_def()) return nullptr;
      idx = table_.size() - 1;
    } else {
      if (!read_uint(&idx)) return nullptr;
      if (idx >= table_.size()) return fail("class table index %llu of %zu", (unsigned long long)idx, table_.size());
    }
    const Entry& e = table_[idx];
    PyTypeObject* tp = reinterpret_cast<PyTypeObject*>(e.cls);
    switch (e.kind) {
      case WK_CLASS:
        Py_INCREF(e.cls);
        return e.cls;
      case WK_STRUCT: {
        // Filled slot by slot, as msgspec's own decoder does: no __init__ or
        // __post_init__ runs.
        Ref obj(tp->tp_alloc(tp, 0));
        if (!obj || !remember(obj.p)) return nullptr;
        char* base = reinterpret_cast<char*>(obj.p);
        for (PyMemberDef* m : e.layout->members) {
          if (absent()) continue;
          PyObject* v = dec(depth + 1);
          if (!v) return nullptr;
          PyObject** slot = reinterpret_cast<PyObject**>(base + m->offset);
          Py_XSETREF(*slot, v);
        }
        return obj.release();
      }
      case WK_PYDANTIC:
      case WK_OBJECT: {
        Ref empty(PyTuple_New(0));
        Ref obj(empty ? PyBaseObject_Type.tp_new(tp, empty.p, nullptr) : nullptr);
        if (!obj || !remember(obj.p)) return nullptr;
        Ref d(attr_dict(e, depth));
        if (!d) return nullptr;
        if ((e.kind == WK_PYDANTIC || PyDict_GET_SIZE(d.p)) && PyObject_GenericSetDict(obj.p, d.p, nullptr) < 0)
          return fail("cannot set the instance __dict__");
        if (e.kind == WK_OBJECT) return set_slots_from_map(obj.p, e, depth) ? obj.release() : nullptr;
        const PydanticSlots& ps = TypeRegistry::instance().pydantic_slots();
        Ref extra(dec(depth + 1));
        if (!extra) return nullptr;
        Ref fields_set(left() >= 9 && *p_ == UINT64 ? fields_set_from_mask(e) : dec(depth + 1));
        if (!fields_set) return nullptr;
        if (!PyAnySet_Check(fields_set.p)) return fail("pydantic fields_set is not a set");
        Ref priv(dec(depth + 1));
        if (!priv) return nullptr;
        char* base = reinterpret_cast<char*>(obj.p);
        if (PyMember_SetOne(base, ps.extra, extra.p) < 0 || PyMember_SetOne(base, ps.fields_set, fields_set.p) < 0 ||
            PyMember_SetOne(base, ps.priv, priv.p) < 0)
          return fail("cannot restore pydantic state");
        return obj.release();
      }
      case WK_TENSOR:
        return tensor_subclass(e, depth);
      default:
        return reduce_instance(e, depth);
    }
  }

  // The values, requires_grad, then nil or the __dict__ (set as a dict
  // update: no attribute setter runs). The subclass is made the way
  // nn.Parameter makes itself, Tensor._make_subclass.
  PyObject* tensor_subclass(const Entry& e, int depth) {
    size_t slot = memo_.size();
    remember(nullptr);
    Ref data(dec(depth + 1));
    if (!data) return nullptr;
    if (!is_exact_tensor(data.p)) return fail("tensor subclass values are not a tensor");
    const uint8_t* q = take(1);
    if (!q) return nullptr;
    if (*q != TRUE_ && *q != FALSE_) return fail("tensor subclass requires_grad is not a bool");
    static PyObject* make = nullptr;
    if (!make) {
      make = PyObject_GetAttrString(tensor_class(), "_make_subclass");
      if (!make) return fail("cannot find torch.Tensor._make_subclass");
    }
    Ref obj(PyObject_CallFunctionObjArgs(make, e.cls, data.p, *q == TRUE_ ? Py_True : Py_False, nullptr));
    if (!obj) return fail("cannot rebuild %s", utf8_or(e.info->name, "?"));
    Py_INCREF(obj.p);
    memo_[slot] = obj.p;
    const uint8_t* at = p_;
    Ref state(dec(depth + 1));
    if (!state) return nullptr;
    if (state.p == Py_None) return obj.release();
    if (!PyDict_CheckExact(state.p)) {
      p_ = at;
      return fail("tensor subclass state is not a map");
    }
    Ref d(PyObject_GenericGetDict(obj.p, nullptr));
    if (!d) return fail("cannot restore the state of %s", utf8_or(e.info->name, "?"));
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(state.p, &pos, &k, &v))
      if (!PyUnicode_CheckExact(k) || PyDict_SetItem(d.p, k, v) < 0) {
        p_ = at;
        return fail("tensor subclass attribute name is not a str");
      }
    return obj.release();
  }

  PyObject* fields_set_from_mask(const Entry& e) {
    uint64_t mask = load_be64(take(9) + 1);
    if (e.layout->names.size() < 64 && (mask >> e.layout->names.size())) return fail("fields_set mask names fields past the layout");
    Ref s(PySet_New(nullptr));
    if (!s) return nullptr;
    for (size_t i = 0; mask; ++i, mask >>= 1)
      if ((mask & 1) && PySet_Add(s.p, e.layout->names[i]) < 0) return nullptr;
    return s.release();
  }

  // Rebuilt as pickle does from __reduce_ex__: the class called with the
  // arguments (or cls.__new__(cls, *args)), then the state, list and dict items.
  PyObject* reduce_instance(const Entry& e, int depth) {
    uint64_t newobj = 0;
    if (e.kind == WK_REDUCE && !read_uint(&newobj)) return nullptr;
    if (newobj > 1) return fail("bad reduce flag");
    const char* what = e.info ? what : "the result of a trusted callable";
    size_t slot = memo_.size();
    remember(nullptr);
    size_t k;
    if (!array_header(&k)) return nullptr;
    Ref args(tuple(k, depth));
    if (!args) return nullptr;
    Ref obj;
    if (newobj) {
      Ref make(PyObject_GetAttrString(e.cls, "__new__"));
      Ref full(make ? PyTuple_New(PyTuple_GET_SIZE(args.p) + 1) : nullptr);
      if (!full) return fail("cannot rebuild %s", what);
      Py_INCREF(e.cls);
      PyTuple_SET_ITEM(full.p, 0, e.cls);
      for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args.p); ++i) {
        Py_INCREF(PyTuple_GET_ITEM(args.p, i));
        PyTuple_SET_ITEM(full.p, i + 1, PyTuple_GET_ITEM(args.p, i));
      }
      obj.p = PyObject_Call(make.p, full.p, nullptr);
    } else {
      obj.p = PyObject_Call(e.cls, args.p, nullptr);
    }
    if (!obj) return fail("cannot rebuild %s", what);
    Py_INCREF(obj.p);
    memo_[slot] = obj.p;
    Ref state(dec(depth + 1));
    if (!state) return nullptr;
    if (state.p != Py_None && !set_state(obj.p, state.p)) return fail("cannot restore the state of %s", what);
    Ref list(dec(depth));
    if (!list) return nullptr;
    if (list.p != Py_None) {
      if (!PyList_CheckExact(list.p)) return fail("list items are not an array");
      Ref r(PyObject_CallMethod(obj.p, "extend", "O", list.p));
      if (!r) return fail("cannot restore the list items of %s", what);
    }
    Ref dict(dec(depth));
    if (!dict) return nullptr;
    if (dict.p != Py_None) {
      if (!PyDict_CheckExact(dict.p)) return fail("dict items are not a map");
      Py_ssize_t pos = 0;
      PyObject *kk, *v;
      while (PyDict_Next(dict.p, &pos, &kk, &v))
        if (PyObject_SetItem(obj.p, kk, v) < 0) return fail("cannot restore the dict items of %s", what);
    }
    return obj.release();
  }

  // pickle's BUILD: __setstate__ if the object has one, else the state is a
  // __dict__ update, or (__dict__ update, slot values).
  static bool set_state(PyObject* obj, PyObject* state) {
    static PyObject* name = PyUnicode_InternFromString("__setstate__");
    static PyObject* kDunder = PyUnicode_InternFromString("__");
    PyObject* setstate;
    if (!name || _PyObject_LookupAttr(obj, name, &setstate) < 0) return false;
    if (setstate) {
      PyObject* r = PyObject_CallOneArg(setstate, state);
      Py_DECREF(setstate);
      Py_XDECREF(r);
      return r != nullptr;
    }
    PyObject* slots = nullptr;
    if (PyTuple_Check(state) && PyTuple_GET_SIZE(state) == 2) {
      slots = PyTuple_GET_ITEM(state, 1);
      state = PyTuple_GET_ITEM(state, 0);
    }
    if (state != Py_None) {
      if (!PyDict_Check(state)) {
        PyErr_SetString(PyExc_TypeError, "state is not a dict");
        return false;
      }
      PyObject* d = PyObject_GenericGetDict(obj, nullptr);
      if (!d) return false;
      int r = PyDict_Update(d, state);
      Py_DECREF(d);
      if (r < 0) return false;
    }
    if (slots && slots != Py_None) {
      if (!PyDict_Check(slots)) {
        PyErr_SetString(PyExc_TypeError, "slot state is not a dict");
        return false;
      }
      Py_ssize_t pos = 0;
      PyObject *k, *v;
      while (PyDict_Next(slots, &pos, &k, &v)) {
        if (!PyUnicode_Check(k) || PyUnicode_Tailmatch(k, kDunder, 0, 2, -1) == 1) {
          PyErr_SetString(PyExc_ValueError, "slot state names a dunder attribute");
          return false;
        }
        if (PyObject_SetAttr(obj, k, v) < 0) return false;
      }
    }
    return true;
  }

  PyObject* surrogate_str(size_t n) {
    const uint8_t* q = take(n);
    if (!q) return nullptr;
    PyObject* s = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(q), Py_ssize_t(n), "surrogatepass");
    return s ? s : fail("invalid UTF-8 in a str of %zu bytes", n);
  }

  PyObject* npscalar() {
    const uint8_t* ln = take(1);
    const uint8_t* ds = ln ? take(*ln) : nullptr;
    if (!ds) return nullptr;
    Ref np, dtype;
    char kind;
    size_t n;
    if (!numeric_dtype(ds, *ln, "numpy scalar", &np, &dtype, &kind, &n)) return nullptr;
    if (n != left()) return fail("numpy scalar of %zu bytes, %zu expected", left(), n);
    const uint8_t* q = take(n);
    if (kind == 'b' && !bool_bytes(q, n)) return fail("bool scalar holds a byte other than 0 and 1");
    Ref raw(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(q), Py_ssize_t(n)));
    Ref arr(raw ? PyObject_CallMethod(np.p, "frombuffer", "OO", raw.p, dtype.p) : nullptr);
    PyObject* out = arr ? PySequence_GetItem(arr.p, 0) : nullptr;
    return out ? out : fail("cannot build numpy scalar");
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
      case BIN8: return read_len(1, &n) ? bin_value(n) : nullptr;
      case BIN16: return read_len(2, &n) ? bin_value(n) : nullptr;
      case BIN32: return read_len(4, &n) ? bin_value(n) : nullptr;
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
  std::deque<Entry> table_;       // (a deque: entries stay put while nested instances add more) the message's class table, in order of definition
  StackGuard guard_;
  std::vector<PyObject*> memo_;   // shared objects in order of first appearance (strong; NULL while rebuilt)
  HashGuard top_guard_;           // a streamed dict's keys, across its segments
};

}  // namespace

struct DecoderSession::Impl {
  DecodeOptions opts;
  Decoder dec;
  explicit Impl(const DecodeOptions& o) : opts(o), dec(nullptr, 0, opts, 0) {}
};

DecoderSession::DecoderSession(const DecodeOptions& opts) : impl_(std::make_unique<Impl>(opts)) {}
DecoderSession::~DecoderSession() = default;

bool DecoderSession::values(const uint8_t* data, size_t len, size_t base, uint64_t count, PyObject* out,
                            const at::Tensor* device_buffer) {
  FB_ASSERT(g_decode_error, "DecodeError not initialised");
  Impl& s = *impl_;
  s.opts.device_buffer = device_buffer;
  s.dec.rebase(data, len, base);
  const bool dict = PyDict_Check(out);
  // As in decode_object: nothing decoded can form a cycle, so the cyclic GC
  // waits until the segment is done.
  int gc_was_enabled = PyGC_Disable();
  bool ok = true;
  for (uint64_t i = 0; ok && i < count; ++i) {
    Ref k(s.dec.top_value());
    if (!k) {
      ok = false;
    } else if (dict) {
      Ref v(s.dec.admit_top_key(k.p) ? s.dec.top_value() : nullptr);
      ok = v && PyDict_SetItem(out, k.p, v.p) == 0;
    } else {
      ok = PyList_Append(out, k.p) == 0;
    }
  }
  if (ok && s.dec.remaining()) ok = (s.dec.trailing(), false);
  if (gc_was_enabled) PyGC_Enable();
  s.opts.device_buffer = nullptr;
  if (!ok && PyErr_Occurred() && !PyErr_ExceptionMatches(g_decode_error) && !pending_is_fatal())
    raise_decode_error_from_pending("decoding failed");
  return ok;
}

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
  if (!o && PyErr_Occurred() && !PyErr_ExceptionMatches(g_decode_error) && !pending_is_fatal()) {
    // Anything else that escaped (MemoryError, a failing Python call) is
    // still reported as a DecodeError.
    raise_decode_error_from_pending("decoding failed");
  }
  return o;
}

}  // namespace fastbcast
