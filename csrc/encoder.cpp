#include "encoder.h"

#include <cstring>
#include <string>
#include <deque>
#include <unordered_map>
#include <utility>

#include "exception.h"
#include "pinned_pool.h"
#include "python_compat.h"
#include "stack_guard.h"
#include "tensor_codec.h"
#include "type_registry.h"
#include "wire.h"

namespace fastbcast {

namespace {

// Numbers each encode, so a TypeInfo can say which message its class table
// slot belongs to.
uint64_t g_epoch = 0;

class Encoder {
 public:
  explicit Encoder(const EncodeOptions& opts) : opts_(opts), epoch_(++g_epoch) {}
  ~Encoder() {
    for (PyObject* o : memo_held_) Py_DECREF(o);
    for (auto& e : table_) {
      Py_DECREF(e.info ? e.info->cls : e.fn);
      Py_XDECREF(e.layout);
    }
  }

  bool run(PyObject* obj, Encoded* out) {
    // No process-wide size hint: a caller that sends similar payloads in a
    // row (a Broadcaster) passes its own through min_capacity, so one large
    // encode never makes every later small one take a large block.
    size_t first = opts_.scratch ? opts_.reserve + 1
                                 : std::max({opts_.min_capacity, opts_.reserve, PinnedPool::kMinBlock});
    if (!set_block(first)) return false;
    len_ = opts_.reserve;
    const Mark start = mark();
    if (!enc(obj, 0)) {
      if (cycle_) return pickle_whole(obj, start) && finish(out);
      if (!pending_is_fatal()) add_path_to_error();
      return false;
    }
    return finish(out);
  }

  bool finish(Encoded* out) {
    out->block = std::move(block_);
    out->data = data_;
    out->len = len_;
    out->device_len = device_len_;
    return true;
  }

  // ---- one encoder, many blocks (EncoderSession) -------------------------
  bool open_block(size_t min_bytes, size_t room) {
    block_ = at::Tensor();
    len_ = 0;
    if (!set_block(std::max({min_bytes, room, PinnedPool::kMinBlock}))) return false;
    len_ = room;
    return true;
  }

  // One item of a top-level container, at the depth write_list gives it.
  // pickle_cycles: a cycle inside the item (not through the container) makes
  // the item one pickle; used once earlier items are sent and the whole
  // value can no longer be (StreamEncoder).
  bool top_item(PyObject* container, Py_ssize_t i, PyObject* item, bool pickle_cycles) {
    stack_[0] = container;
    Hold h(item);
    Mark m = mark();
    if (enc(item, 1)) return true;
    if (pickle_cycles && cycle_) {
      if (!cycle_top_) return pickle_whole(item, m) || top_failed(index_segment(i));
      cycle_through_sent_container();
    }
    return top_failed(index_segment(i));
  }

  bool top_pair(PyObject* container, PyObject* k, PyObject* v, bool pickle_cycles) {
    stack_[0] = container;
    Hold hk(k), hv(v);
    if (opts_.compat && !compat_key(k)) return top_failed(key_segment(k, true));
    if (!enc(k, 1)) return top_failed(key_segment(k, true));
    Mark m = mark();
    if (enc(v, 1)) return true;
    if (pickle_cycles && cycle_) {
      if (!cycle_top_) return pickle_whole(v, m) || top_failed(key_segment(k, false));
      cycle_through_sent_container();
    }
    return top_failed(key_segment(k, false));
  }

  void cycle_through_sent_container() {
    if (pending_is_fatal()) return;
    PyErr_SetString(PyExc_ValueError,
                    "the object contains a reference cycle through the top-level container, found after its first "
                    "items were streamed, so it cannot travel as one pickle (FASTBCAST_STREAM_BYTES=0 or "
                    "Broadcaster(stream_bytes=0) sends it whole)");
  }

  // After a failed item: whether a cycle (with pickles allowed) failed it,
  // so the caller may send the whole value as one pickle instead.
  bool found_cycle() const { return cycle_; }

  // The session's whole value as one pickle in a new block (nothing of it
  // was sent yet).
  bool pickle_session(PyObject* obj, size_t min_bytes, size_t room) {
    rollback(Mark{});
    return open_block(min_bytes, room) && write_pickle(obj);
  }

  bool append(const uint8_t* p, size_t n) {
    if (!reserve(n)) return false;
    put_bytes(p, n);
    return true;
  }
  uint8_t* data() { return data_; }
  size_t len() const { return len_; }
  void truncate(size_t n) { len_ = n; }
  const at::Tensor& block() const { return block_; }
  uint64_t take_device_len() { return std::exchange(device_len_, 0); }

 private:
  // ---- buffer -----------------------------------------------------------
  bool set_block(size_t min_bytes) {
    if (opts_.scratch && min_bytes <= opts_.scratch_limit) {
      // The caller's memory: a small frame costs no pool block (and no
      // tensor); resize keeps what was written so far.
      try {
        if (opts_.scratch->size() < min_bytes) opts_.scratch->resize(std::min(opts_.scratch_limit, 2 * min_bytes));
      } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
        return false;
      }
      data_ = opts_.scratch->data();
      cap_ = opts_.scratch->size();
      return true;
    }
    at::Tensor b;
    try {
      b = PinnedPool::instance().acquire(min_bytes);
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_MemoryError, e.what_without_backtrace());
      return false;
    }
    if (len_) std::memcpy(b.data_ptr<uint8_t>(), data_, len_);
    block_ = std::move(b);
    data_ = block_.data_ptr<uint8_t>();
    cap_ = block_.numel();
    return true;
  }

  bool grow(size_t n) {
    size_t want = std::max(cap_ * 2, len_ + n);
    return set_block(want);
  }

  FB_INLINE bool reserve(size_t n) { return FB_LIKELY(len_ + n <= cap_) || grow(n); }
  FB_INLINE void put(uint8_t b) { data_[len_++] = b; }
  FB_INLINE void put_be16(uint16_t v) { store_be16(data_ + len_, v); len_ += 2; }
  FB_INLINE void put_be32(uint32_t v) { store_be32(data_ + len_, v); len_ += 4; }
  FB_INLINE void put_be64(uint64_t v) { store_be64(data_ + len_, v); len_ += 8; }
  FB_INLINE void put_bytes(const void* p, size_t n) {
    if (n) std::memcpy(data_ + len_, p, n);  // p may be NULL when n == 0 (an empty buffer)
    len_ += n;
  }

  // ---- scalars ----------------------------------------------------------
  FB_INLINE bool write_int64(int64_t v) {
    if (!reserve(9)) return false;
    if (v >= 0) {
      if (v <= 0x7f) {
        put(uint8_t(v));
      } else if (v <= 0xff) {
        put(UINT8), put(uint8_t(v));
      } else if (v <= 0xffff) {
        put(UINT16), put_be16(uint16_t(v));
      } else if (v <= 0xffffffffLL) {
        put(UINT32), put_be32(uint32_t(v));
      } else {
        put(UINT64), put_be64(uint64_t(v));
      }
    } else {
      if (v >= -32) {
        put(uint8_t(int8_t(v)));
      } else if (v >= -128) {
        put(INT8), put(uint8_t(int8_t(v)));
      } else if (v >= -32768) {
        put(INT16), put_be16(uint16_t(int16_t(v)));
      } else if (v >= -2147483648LL) {
        put(INT32), put_be32(uint32_t(int32_t(v)));
      } else {
        put(INT64), put_be64(uint64_t(v));
      }
    }
    return true;
  }

  bool write_int(PyObject* o) {
    int64_t v;
    if (FB_LIKELY(compact_long(o, &v))) return write_int64(v);
    int overflow = 0;
    long long ll = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (ll == -1 && PyErr_Occurred()) return false;
    if (!overflow) return write_int64(ll);
    if (overflow > 0) {
      unsigned long long u = PyLong_AsUnsignedLongLong(o);
      if (!(u == (unsigned long long)-1 && PyErr_Occurred())) {
        if (!reserve(9)) return false;
        put(UINT64), put_be64(u);
        return true;
      }
      PyErr_Clear();
    }
    return write_bigint(o);
  }

  bool write_bigint(PyObject* o) {
    if (opts_.compat) return unsupported(o, "int outside 64 bits in compat mode");
    // Two's complement needs bit_length(v) + 1 bits for v >= 0 and
    // bit_length(~v) + 1 for v < 0 (so -2^71 takes 9 bytes, not 10).
    bool neg = _PyLong_Sign(o) < 0;
    PyObject* mag = neg ? PyNumber_Invert(o) : (Py_INCREF(o), o);
    if (!mag) return false;
    size_t bits = _PyLong_NumBits(mag);
    Py_DECREF(mag);
    if (bits == size_t(-1) && PyErr_Occurred()) return false;
    Py_ssize_t n = Py_ssize_t(bits / 8 + 1);
    PyObject* meth = PyObject_GetAttrString(o, "to_bytes");
    PyObject* args = meth ? Py_BuildValue("(ns)", n, "little") : nullptr;
    PyObject* kw = args ? Py_BuildValue("{s:O}", "signed", Py_True) : nullptr;
    PyObject* b = kw ? PyObject_Call(meth, args, kw) : nullptr;
    Py_XDECREF(meth);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    if (!b) return false;
    bool ok = write_ext_header(PyBytes_GET_SIZE(b), EXT_BIGINT) &&
              (put_bytes(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b)), true);
    Py_DECREF(b);
    return ok;
  }

  FB_INLINE bool write_float(double d) {
    if (!reserve(9)) return false;
    uint64_t bits;
    std::memcpy(&bits, &d, 8);
    put(FLOAT64), put_be64(bits);
    return true;
  }

  FB_INLINE bool write_str(PyObject* o) {
    const char* s;
    Py_ssize_t n;
    if (FB_LIKELY(PyUnicode_IS_COMPACT_ASCII(o))) {
      s = static_cast<const char*>(PyUnicode_DATA(o));
      n = PyUnicode_GET_LENGTH(o);
    } else {
      s = PyUnicode_AsUTF8AndSize(o, &n);
      if (!s) return write_surrogate_str(o);
    }
    if (FB_UNLIKELY(uint64_t(n) > 0xffffffffULL)) return too_long(o, "str");
    if (!reserve(5 + n)) return false;
    if (n < 32) {
      put(uint8_t(FIXSTR | n));
    } else if (n <= 0xff) {
      put(STR8), put(uint8_t(n));
    } else if (n <= 0xffff) {
      put(STR16), put_be16(uint16_t(n));
    } else {
      put(STR32), put_be32(uint32_t(n));
    }
    put_bytes(s, n);
    return true;
  }

  // A str with lone surrogates (json.loads of model output can make one): no
  // UTF-8 exists for it, so it travels as UTF-8 with surrogatepass, as pickle
  // carries it.
  bool write_surrogate_str(PyObject* o) {
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return false;
    PyErr_Clear();
    if (opts_.compat) return unsupported(o, "str with a lone surrogate in compat mode (MessagePack str is UTF-8)");
    PyObject* b = PyUnicode_AsEncodedString(o, "utf-8", "surrogatepass");
    if (!b) return false;
    bool ok = write_ext_header(PyBytes_GET_SIZE(b), EXT_SURROGATE_STR);
    if (ok) put_bytes(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return ok;
  }

  bool write_bin(const void* p, size_t n, PyObject* o) {
    if (n > 0xffffffffULL) return too_long(o, "bytes");
    if (!reserve(5 + n)) return false;
    if (n <= 0xff) {
      put(BIN8), put(uint8_t(n));
    } else if (n <= 0xffff) {
      put(BIN16), put_be16(uint16_t(n));
    } else {
      put(BIN32), put_be32(uint32_t(n));
    }
    put_bytes(p, n);
    return true;
  }

  // Raw bytes as an ext (BYTEARRAY, MEMORYVIEW) or, in compat mode, as bin.
  bool write_raw(const void* p, size_t n, int8_t ext, PyObject* o) {
    if (opts_.compat) return write_bin(p, n, o);
    if (!write_ext_header(n, ext)) return false;
    put_bytes(p, n);
    return true;
  }

  // ---- headers ----------------------------------------------------------
  FB_INLINE bool write_array_header(size_t n, PyObject* o) {
    if (FB_UNLIKELY(n > 0xffffffffULL)) return too_long(o, "sequence");
    if (!reserve(5)) return false;
    if (n < 16) {
      put(uint8_t(FIXARRAY | n));
    } else if (n <= 0xffff) {
      put(ARRAY16), put_be16(uint16_t(n));
    } else {
      put(ARRAY32), put_be32(uint32_t(n));
    }
    return true;
  }

  FB_INLINE bool write_map_header(size_t n, PyObject* o) {
    if (FB_UNLIKELY(n > 0xffffffffULL)) return too_long(o, "dict");
    if (!reserve(5)) return false;
    if (n < 16) {
      put(uint8_t(FIXMAP | n));
    } else if (n <= 0xffff) {
      put(MAP16), put_be16(uint16_t(n));
    } else {
      put(MAP32), put_be32(uint32_t(n));
    }
    return true;
  }

  // Ext header for a payload of known length; the caller then writes n bytes
  // (reserve() already covers them).
  bool write_ext_header(size_t n, int8_t type) {
    if (n > 0xffffffffULL) {
      PyErr_SetString(PyExc_ValueError, "value longer than 4 GiB");
      return false;
    }
    if (!reserve(6 + n)) return false;
    switch (n) {
      case 1: put(FIXEXT1); break;
      case 2: put(FIXEXT2); break;
      case 4: put(FIXEXT4); break;
      case 8: put(FIXEXT8); break;
      case 16: put(FIXEXT16); break;
      default:
        if (n <= 0xff) {
          put(EXT8), put(uint8_t(n));
        } else if (n <= 0xffff) {
          put(EXT16), put_be16(uint16_t(n));
        } else {
          put(EXT32), put_be32(uint32_t(n));
        }
    }
    put(uint8_t(type));
    return true;
  }

  // An ext whose payload is itself MessagePack of unknown length: always the
  // EXT32 form, length patched once the payload is written.
  bool begin_nested_ext(int8_t type, size_t* start) {
    if (!reserve(6)) return false;
    put(EXT32);
    len_ += 4;
    put(uint8_t(type));
    *start = len_;
    return true;
  }
  bool end_nested_ext(size_t start) {
    size_t n = len_ - start;
    if (n > 0xffffffffULL) {
      PyErr_SetString(PyExc_ValueError, "value longer than 4 GiB");
      return false;
    }
    store_be32(data_ + start - 5, uint32_t(n));
    return true;
  }

  // ---- containers -------------------------------------------------------
  bool write_list(PyObject* o, int depth) {
    Py_ssize_t n = PyList_GET_SIZE(o);
    if (!opts_.compat && size_t(n) >= kIntBlockMin && PyLong_CheckExact(PyList_GET_ITEM(o, 0))) {
      int r = try_int_block(o, n);
      if (r != 0) return r > 0;
    }
    if (!write_array_header(n, o)) return false;
    // The list may shrink under us only through user code (__eq__, finalizers)
    // that the encoder never calls; re-read the size anyway rather than trust it.
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (FB_UNLIKELY(i >= PyList_GET_SIZE(o))) {
        PyErr_SetString(PyExc_RuntimeError, "list changed size during encoding");
        return false;
      }
      if (!enc(PyList_GET_ITEM(o, i), depth)) return index_segment(i);
    }
    return true;
  }

  // Returns 1 if written as a block, 0 if the list is not a homogeneous int
  // list (nothing written), -1 on error.
  //
  // The common case (token ids, masks, positions: small non-negative ints)
  // takes one pass over the int objects, staging each value as u32 just past
  // the largest possible header and narrowing in place at the end (the
  // narrowed copy never overtakes its source). A run of the same object (a
  // mask of 1s) costs a pointer compare per element. Anything else (a
  // negative or large value) falls back to the general two-pass writer.
  int try_int_block(PyObject* o, Py_ssize_t n) {
    constexpr size_t kHead = 6 + 1;
    if (!reserve(kHead + 4 * size_t(n))) return -1;
    const size_t stage_at = len_ + kHead;
    uint8_t* stage = data_ + stage_at;
    PyObject** items = reinterpret_cast<PyListObject*>(o)->ob_item;
    PyObject* prev = nullptr;
    uint32_t pv = 0, bits = 0;  // OR of all values: below 2^k exactly when every value is
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* it = items[i];
      if (it != prev) {
        // Token ids are scattered heap objects: fetch a few ahead so the
        // loop is not one cache miss per element.
        if (i + 16 < n) __builtin_prefetch(items[i + 16]);
        int64_t v;
        if (FB_UNLIKELY(!PyLong_CheckExact(it))) return 0;
        if (FB_UNLIKELY(!compact_long(it, &v) || v < 0)) return try_int_block_general(o, n);
        prev = it;
        pv = uint32_t(v);
        bits |= pv;
      }
      store_le<uint32_t>(stage + 4 * i, pv);
    }
    IntWidth w = bits <= 0xff ? W_U8 : bits <= 0xffff ? W_U16 : W_U32;
    size_t wb = kIntWidthBytes[w];
    if (!write_ext_header(1 + wb * size_t(n), EXT_INT_BLOCK)) return -1;  // space is reserved: no regrow
    put(uint8_t(w));
    uint8_t* dst = data_ + len_;
    FB_ASSERT(dst <= data_ + stage_at);
    switch (w) {
      case W_U8:
        for (Py_ssize_t i = 0; i < n; ++i) dst[i] = uint8_t(load_le<uint32_t>(stage + 4 * i));
        break;
      case W_U16:
        for (Py_ssize_t i = 0; i < n; ++i) store_le<uint16_t>(dst + 2 * i, uint16_t(load_le<uint32_t>(stage + 4 * i)));
        break;
      default:
        std::memmove(dst, stage, 4 * size_t(n));
    }
    len_ += wb * size_t(n);
    return 1;
  }

  // Two passes over the int objects: the first checks types and finds the
  // range, the second writes each value in the chosen width (a list's int
  // objects are still in cache for it).
  int try_int_block_general(PyObject* o, Py_ssize_t n) {
    PyObject** items = reinterpret_cast<PyListObject*>(o)->ob_item;
    int64_t lo = 0, hi = 0;
    bool above_i64 = false;  // some value is in [2^63, 2^64): only W_U64 holds it
    for (Py_ssize_t i = 0; i < n; ++i) {
      // Token ids are scattered heap objects: fetch a few ahead so the loop
      // is not one cache miss per element.
      if (i + 16 < n) __builtin_prefetch(items[i + 16]);
      PyObject* it = items[i];
      if (FB_UNLIKELY(!PyLong_CheckExact(it))) return 0;
      int64_t v;
      if (FB_UNLIKELY(!compact_long(it, &v))) {
        int overflow = 0;
        v = PyLong_AsLongLongAndOverflow(it, &overflow);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (overflow) {
          if (overflow < 0) return 0;  // below -2^63: the generic path writes a big int
          unsigned long long u = PyLong_AsUnsignedLongLong(it);
          if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;  // 2^64 or more
          }
          above_i64 = true;
          continue;
        }
      }
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    IntWidth w;
    if (above_i64) {
      if (lo < 0) return 0;  // needs more than 64 bits per item
      w = W_U64;
    } else if (lo >= 0) {
      w = hi <= 0xff ? W_U8 : hi <= 0xffff ? W_U16 : hi <= 0xffffffffLL ? W_U32 : W_I64;
    } else {
      w = (lo >= INT32_MIN && hi <= INT32_MAX) ? W_I32 : W_I64;
    }
    size_t wb = kIntWidthBytes[w];
    if (!write_ext_header(1 + wb * size_t(n), EXT_INT_BLOCK)) return -1;  // also reserves the payload
    put(uint8_t(w));
    uint8_t* dst = data_ + len_;
    switch (w) {
      case W_U8:
        for (Py_ssize_t i = 0; i < n; ++i) dst[i] = uint8_t(int_value(items[i]));
        break;
      case W_U16:
        for (Py_ssize_t i = 0; i < n; ++i) store_le<uint16_t>(dst + 2 * i, uint16_t(int_value(items[i])));
        break;
      case W_U32:
      case W_I32:
        for (Py_ssize_t i = 0; i < n; ++i) store_le<uint32_t>(dst + 4 * i, uint32_t(int_value(items[i])));
        break;
      case W_I64:
        for (Py_ssize_t i = 0; i < n; ++i) store_le<int64_t>(dst + 8 * i, int_value(items[i]));
        break;
      case W_U64:
        for (Py_ssize_t i = 0; i < n; ++i) store_le<uint64_t>(dst + 8 * i, PyLong_AsUnsignedLongLong(items[i]));
        break;
    }
    len_ += wb * size_t(n);
    return 1;
  }

  // The value of an int already checked by try_int_block to fit int64.
  static FB_INLINE int64_t int_value(PyObject* it) {
    int64_t v;
    return FB_LIKELY(compact_long(it, &v)) ? v : int64_t(PyLong_AsLongLong(it));
  }

  bool write_dict(PyObject* o, int depth) {
    if (!write_map_header(PyDict_GET_SIZE(o), o)) return false;
    Py_ssize_t pos = 0, n = PyDict_GET_SIZE(o);
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
      if (FB_UNLIKELY(--n < 0)) break;
      Hold hk(k), hv(v);
      if (opts_.compat && !compat_key(k)) return key_segment(k, true);
      if (!enc(k, depth)) return key_segment(k, true);
      if (!enc(v, depth)) return key_segment(k, false);
    }
    if (n != 0) {
      PyErr_SetString(PyExc_RuntimeError, "dict changed size during encoding");
      return false;
    }
    return true;
  }

  // compat mode writes tuples and frozensets as arrays, which decode to
  // lists: as map keys they would be unhashable, so the encoder refuses them
  // rather than the receiver.
  bool compat_key(PyObject* k) {
    PyTypeObject* t = Py_TYPE(k);
    if (t == &PyUnicode_Type || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type || k == Py_None ||
        t == &PyBytes_Type)
      return true;
    return unsupported(k, "map key that compat mode cannot give back hashable (it writes only plain MessagePack)");
  }

  bool write_tuple(PyObject* o, int depth) {
    size_t start = 0;
    if (!opts_.compat && !begin_nested_ext(EXT_TUPLE, &start)) return false;
    Py_ssize_t n = PyTuple_GET_SIZE(o);
    if (!write_array_header(n, o)) return false;
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!enc(PyTuple_GET_ITEM(o, i), depth)) return index_segment(i);
    return opts_.compat || end_nested_ext(start);
  }

  bool write_set(PyObject* o, int depth, int8_t ext) {
    size_t start = 0;
    if (!opts_.compat && !begin_nested_ext(ext, &start)) return false;
    Py_ssize_t n = PySet_GET_SIZE(o);
    if (!write_array_header(n, o)) return false;
    PyObject* it = PyObject_GetIter(o);
    if (!it) return false;
    PyObject* item;
    Py_ssize_t i = 0;
    while ((item = PyIter_Next(it))) {
      bool ok = ++i <= n && enc(item, depth);
      if (!ok && !PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "set changed size during encoding");
      if (!ok) path_.push_back("{" + safe_repr(item) + "}");
      Py_DECREF(item);
      if (!ok) {
        Py_DECREF(it);
        return false;
      }
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return false;
    return opts_.compat || end_nested_ext(start);
  }

  // ---- ext leaves -------------------------------------------------------
  bool write_complex(PyObject* o) {
    if (opts_.compat) return unsupported(o, "complex in compat mode");
    Py_complex c = PyComplex_AsCComplex(o);
    if (!write_ext_header(16, EXT_COMPLEX)) return false;
    store_le<double>(data_ + len_, c.real);
    store_le<double>(data_ + len_ + 8, c.imag);
    len_ += 16;
    return true;
  }

  bool write_tensor_header(const at::Tensor& t, int code, size_t extra, int8_t ext) {
    int64_t ndim = t.dim();
    if (ndim > 255) {
      PyErr_SetString(PyExc_ValueError, "tensor with more than 255 dimensions");
      return false;
    }
    if (!write_ext_header(2 + 8 * ndim + extra, ext)) return false;
    put(uint8_t(code));
    put(uint8_t(ndim));
    for (int64_t d = 0; d < ndim; ++d) {
      store_le<int64_t>(data_ + len_, t.size(d));
      len_ += 8;
    }
    return true;
  }

  bool write_tensor(PyObject* o) {
    if (opts_.compat) return unsupported(o, "torch.Tensor in compat mode");
    const at::Tensor& src = unpack_tensor(o);
    int code = dtype_code(src.scalar_type());
    if (code < 0 || src.layout() != at::kStrided || src.is_quantized())
      return fallback(o, ("tensor of dtype " + std::string(c10::toString(src.scalar_type())) +
                             " / layout " + c10::str(src.layout())).c_str());
    try {
      if (src.is_cuda()) {
        if (!opts_.cuda_tensors)
          return unsupported(o, "CUDA tensor: only a broadcast over an NCCL group carries CUDA tensors (device "
                                "to device); fastbcast.encode and gloo groups carry host bytes, so .cpu() it first");
        at::Tensor t = src.detach().resolve_conj().resolve_neg().contiguous();
        size_t off = (device_len_ + kDeviceAlign - 1) / kDeviceAlign * kDeviceAlign;
        if (!write_tensor_header(t, code, 8, EXT_CUDA_REF)) return false;
        store_le<uint64_t>(data_ + len_, off);
        len_ += 8;
        device_len_ = off + t.nbytes();
        opts_.cuda_tensors->push_back(std::move(t));
        return true;
      }
      if (!src.is_cpu()) return fallback(o, ("tensor on device " + src.device().str()).c_str());
      at::Tensor t = src.detach().resolve_conj().resolve_neg().contiguous();
      size_t nbytes = t.nbytes();
      if (!write_tensor_header(t, code, nbytes, EXT_TENSOR)) return false;
      if (nbytes) std::memcpy(data_ + len_, t.data_ptr(), nbytes);
      len_ += nbytes;
      return true;
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
      return false;
    }
  }

  bool write_buffer_ext(PyObject* o, int8_t ext, const char* prefix, size_t prefix_len) {
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_FULL_RO) < 0) return false;
    size_t n = size_t(view.len);
    bool ok = false;
    if (opts_.compat) {
      ok = reserve(5 + n) && write_bin_header(n, o);
    } else {
      ok = write_ext_header(prefix_len + n, ext);
      if (ok) put_bytes(prefix, prefix_len);
    }
    if (ok) {
      ok = PyBuffer_ToContiguous(data_ + len_, &view, view.len, 'C') == 0;
      if (ok) len_ += n;
    }
    PyBuffer_Release(&view);
    return ok;
  }

  bool write_bin_header(size_t n, PyObject* o) {
    if (n > 0xffffffffULL) return too_long(o, "bytes");
    if (n <= 0xff) {
      put(BIN8), put(uint8_t(n));
    } else if (n <= 0xffff) {
      put(BIN16), put_be16(uint16_t(n));
    } else {
      put(BIN32), put_be32(uint32_t(n));
    }
    return true;
  }

  bool write_ndarray(PyObject* o) {
    if (opts_.compat) return unsupported(o, "numpy.ndarray in compat mode");
    PyObject* dtype = PyObject_GetAttrString(o, "dtype");
    PyObject* kind = dtype ? PyObject_GetAttrString(dtype, "kind") : nullptr;
    PyObject* str = kind ? PyObject_GetAttrString(dtype, "str") : nullptr;
    PyObject* shape = str ? PyObject_GetAttrString(o, "shape") : nullptr;
    bool ok = false;
    if (shape) {
      const char* k = PyUnicode_AsUTF8(kind);
      Py_ssize_t sn;
      const char* s = PyUnicode_AsUTF8AndSize(str, &sn);
      Py_ssize_t ndim = PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : -1;
      if (k && s && std::strchr("biufc", k[0]) && k[0] && sn < 256 && ndim >= 0 && ndim < 256) {
        std::string prefix;
        prefix.push_back(char(sn));
        prefix.append(s, sn);
        prefix.push_back(char(ndim));
        ok = true;
        for (Py_ssize_t d = 0; ok && d < ndim; ++d) {
          long long dim = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
          if (dim == -1 && PyErr_Occurred()) ok = false;
          char b[8];
          store_le<int64_t>(reinterpret_cast<uint8_t*>(b), dim);
          prefix.append(b, 8);
        }
        ok = ok && write_buffer_ext(o, EXT_NDARRAY, prefix.data(), prefix.size());
      } else if (!PyErr_Occurred()) {
        ok = fallback(o, ("numpy.ndarray of dtype " + std::string(s ? s : "?")).c_str());
      }
    }
    Py_XDECREF(dtype);
    Py_XDECREF(kind);
    Py_XDECREF(str);
    Py_XDECREF(shape);
    return ok;
  }

  bool write_pyarray(PyObject* o) {
    if (opts_.compat) return unsupported(o, "array.array in compat mode");
    PyObject* tc = PyObject_GetAttrString(o, "typecode");
    if (!tc) return false;
    const char* s = PyUnicode_AsUTF8(tc);
    char code = s ? s[0] : 0;
    Py_DECREF(tc);
    if (!s) return false;
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_FULL_RO) < 0) return false;
    size_t isz = size_t(view.itemsize), count = isz ? size_t(view.len) / isz : 0;
    const uint8_t* src = static_cast<const uint8_t*>(view.buf);
    // Integer items take the narrowest width that holds every value (token
    // ids in array('q') fit 4 bytes); the typecode brings the original back.
    uint8_t w = kRawWidth;
    bool is_signed = std::strchr("bhilq", code) != nullptr, is_int = is_signed || std::strchr("BHILQ", code);
    if (is_int && count && (isz == 1 || isz == 2 || isz == 4 || isz == 8)) {
      if (is_signed) {
        int64_t lo = 0, hi = 0;
        for (size_t i = 0; i < count; ++i) {
          int64_t v = signed_item(src + i * isz, isz);
          lo = v < lo ? v : lo;
          hi = v > hi ? v : hi;
        }
        w = lo >= 0 ? (hi <= 0xff ? W_U8 : hi <= 0xffff ? W_U16 : hi <= 0xffffffffLL ? W_U32 : W_I64)
                    : (lo >= INT32_MIN && hi <= INT32_MAX) ? W_I32 : W_I64;
      } else {
        uint64_t hi = 0;
        for (size_t i = 0; i < count; ++i) hi |= unsigned_item(src + i * isz, isz);
        w = hi <= 0xff ? W_U8 : hi <= 0xffff ? W_U16 : hi <= 0xffffffffULL ? W_U32 : W_U64;
      }
      if (kIntWidthBytes[w] >= isz) w = kRawWidth;
    }
    size_t wb = w == kRawWidth ? isz : kIntWidthBytes[w];
    bool ok = write_ext_header(2 + wb * count, EXT_PYARRAY);
    if (ok) {
      put(uint8_t(code));
      put(w);
      uint8_t* dst = data_ + len_;
      if (w == kRawWidth) {
        put_bytes(src, view.len);
      } else {
        for (size_t i = 0; i < count; ++i) {
          uint64_t v = is_signed ? uint64_t(signed_item(src + i * isz, isz)) : unsigned_item(src + i * isz, isz);
          switch (wb) {
            case 1: dst[i] = uint8_t(v); break;
            case 2: store_le<uint16_t>(dst + 2 * i, uint16_t(v)); break;
            case 4: store_le<uint32_t>(dst + 4 * i, uint32_t(v)); break;
            default: store_le<uint64_t>(dst + 8 * i, v);
          }
        }
        len_ += wb * count;
      }
    }
    PyBuffer_Release(&view);
    return ok;
  }

  static int64_t signed_item(const uint8_t* p, size_t isz) {
    switch (isz) {
      case 1: return int8_t(p[0]);
      case 2: return load_le<int16_t>(p);
      case 4: return load_le<int32_t>(p);
      default: return load_le<int64_t>(p);
    }
  }
  static uint64_t unsigned_item(const uint8_t* p, size_t isz) {
    switch (isz) {
      case 1: return p[0];
      case 2: return load_le<uint16_t>(p);
      case 4: return load_le<uint32_t>(p);
      default: return load_le<uint64_t>(p);
    }
  }

  // np.float64 rewards, np.int64 counts: dtype string and the raw value.
  bool write_npscalar(PyObject* o) {
    if (opts_.compat) return unsupported(o, "numpy scalar in compat mode");
    PyObject* dtype = PyObject_GetAttrString(o, "dtype");
    PyObject* kind = dtype ? PyObject_GetAttrString(dtype, "kind") : nullptr;
    PyObject* str = kind ? PyObject_GetAttrString(dtype, "str") : nullptr;
    PyObject* raw = str ? PyObject_CallMethod(o, "tobytes", nullptr) : nullptr;
    bool ok = false;
    if (raw) {
      const char* k = utf8_or(kind, "?");
      Py_ssize_t sn = 0;
      const char* s = PyUnicode_Check(str) ? PyUnicode_AsUTF8AndSize(str, &sn) : nullptr;
      if (s && k[0] && std::strchr("biufc", k[0]) && sn < 256 && PyBytes_Check(raw)) {
        Py_ssize_t n = PyBytes_GET_SIZE(raw);
        ok = write_ext_header(1 + sn + n, EXT_NPSCALAR);
        if (ok) {
          put(uint8_t(sn));
          put_bytes(s, sn);
          put_bytes(PyBytes_AS_STRING(raw), n);
        }
      } else if (!PyErr_Occurred() || clear_unless_fatal()) {
        ok = fallback(o, "numpy scalar of this dtype");
      }
    }
    Py_XDECREF(dtype);
    Py_XDECREF(kind);
    Py_XDECREF(str);
    Py_XDECREF(raw);
    return ok;
  }

  bool write_pickle(PyObject* o) {
    // An object whose __reduce_ex__ write_reduce has asked is pickled with
    // that answer (fastbcast.codec._dumps_reduced): a reducer runs once.
    const bool reduced = reduced_obj_ == o;
    PyObject* pickle = PyImport_ImportModule(reduced ? "fastbcast.codec" : "pickle");
    if (!pickle) return false;
    PyObject* b = reduced ? PyObject_CallMethod(pickle, "_dumps_reduced", "OO", o, reduced_rv_)
                          : PyObject_CallMethod(pickle, "dumps", "Oi", o, 5);
    Py_DECREF(pickle);
    if (!b) return false;
    bool ok = write_ext_header(PyBytes_GET_SIZE(b), EXT_PICKLE);
    if (ok) put_bytes(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    ++pickles_;
    return ok;
  }

  // ---- shared references ------------------------------------------------
  // Tensors, arrays, long bytes and class instances take a memo slot, numbered
  // in the order they first appear; a later appearance is an EXT_REF to it,
  // so it travels once and comes back as one object, as with pickle. The
  // memo holds a reference to each object, so no address is reused while the
  // message is written. Returns 1 if `o` was written as a reference, 0 if it
  // took a new slot (the caller writes it), -1 on error.
  //
  // A slot is taken only once `o` is known to travel natively (a pickle
  // fallback takes none), in the same order the decoder fills them.
  void memo_add(PyObject* o, bool ready = true) {
    if (opts_.compat) return;
    memo_.emplace(o, uint32_t(memo_held_.size()));
    Py_INCREF(o);
    memo_held_.push_back(o);
    memo_ready_.push_back(ready);
  }

  int memo(PyObject* o) {
    if (opts_.compat) return 0;
    auto it = memo_.find(o);
    if (it == memo_.end()) return 0;
    if (!memo_ready_[it->second]) {
      // Only an object rebuilt from its arguments (a __reduce__) is still
      // missing on the receiver while they are read. (Where the cycle
      // runs is unknown here: taken as through the top-level value.)
      if (opts_.allow_pickle && !opts_.compat) cycle_ = cycle_top_ = true;
      PyErr_Format(PyExc_ValueError,
                   "the object contains a reference cycle through the arguments of %s.__reduce__, which pickle "
                   "protocol state cannot express",
                   Py_TYPE(o)->tp_name);
      return -1;
    }
    size_t start;
    if (!begin_nested_ext(EXT_REF, &start) || !write_int64(it->second) || !end_nested_ext(start)) return -1;
    return 1;
  }

  // A tensor or array: a reference if it already travelled, else written and
  // given a memo slot unless it went as a pickle.
  bool shared_leaf(PyObject* o, bool (Encoder::*write)(PyObject*)) {
    int r = memo(o);
    if (r) return r > 0;
    size_t pickles = pickles_;
    if (!(this->*write)(o)) return false;
    if (pickles_ == pickles) memo_add(o);
    return true;
  }

  // ---- class instances --------------------------------------------------
  struct TableEntry {
    TypeInfo* info;      // its class is held (strong) by the table; NULL for WK_CALL
    uint8_t kind;        // WireKind
    PyObject* layout;    // PYDANTIC / OBJECT: the first instance's attribute names (tuple); else NULL
    PyObject* fn = nullptr;  // WK_CALL: the rebuild callable (strong)
  };

  // Starts an instance: the class table entry the first time, its index
  // after that. `layout_from` is the first instance's __dict__ (or NULL).
  bool begin_instance(TypeInfo* info, uint8_t kind, PyObject* layout_from, size_t* start, TableEntry** entry) {
    uint32_t idx = UINT32_MAX;
    if (kind != WK_CLASS && info->msg_epoch == epoch_) {
      idx = info->msg_index;
    } else {
      // A nested encode (user code calling fastbcast.encode) may have taken
      // the slot: the table itself is the truth.
      for (size_t i = 0; i < table_.size(); ++i)
        if (table_[i].info == info && table_[i].kind == kind) idx = uint32_t(i);
    }
    if (idx != UINT32_MAX) {
      if (kind != WK_CLASS) info->msg_epoch = epoch_, info->msg_index = idx;
      *entry = &table_[idx];
      return begin_nested_ext(EXT_OBJECT, start) && write_int64(idx);
    }
    PyObject* layout = nullptr;
    if (kind == WK_STRUCT) {
      layout = info->fields;
      Py_INCREF(layout);
    } else if (kind == WK_PYDANTIC || kind == WK_OBJECT) {
      layout = attribute_layout(layout_from);
      if (!layout) return false;
    }
    Py_INCREF(info->cls);
    table_.push_back({info, kind, layout});
    idx = uint32_t(table_.size() - 1);
    if (kind != WK_CLASS) info->msg_epoch = epoch_, info->msg_index = idx;
    *entry = &table_[idx];
    if (!begin_nested_ext(EXT_OBJECT_DEF, start) || !write_array_header(3, nullptr) || !write_str(info->name) ||
        !write_int64(kind))
      return false;
    Py_ssize_t n = layout ? PyTuple_GET_SIZE(layout) : 0;
    if (!write_array_header(n, nullptr)) return false;
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!write_str(PyTuple_GET_ITEM(layout, i))) return false;
    return true;
  }

  // The leading str keys of an instance dict, at most kMaxLayout.
  static PyObject* attribute_layout(PyObject* dict) {
    Py_ssize_t pos = 0, n = 0;
    PyObject *k, *v;
    while (dict && size_t(n) < kMaxLayout && PyDict_Next(dict, &pos, &k, &v) && PyUnicode_CheckExact(k)) ++n;
    PyObject* t = PyTuple_New(n);
    if (!t) return nullptr;
    pos = 0;
    for (Py_ssize_t i = 0; i < n && PyDict_Next(dict, &pos, &k, &v); ++i) {
      Py_INCREF(k);
      PyTuple_SET_ITEM(t, i, k);
    }
    return t;
  }

  bool write_absent() {
    if (!reserve(3)) return false;
    put(EXT8), put(0), put(uint8_t(EXT_ABSENT));
    return true;
  }

  // An instance __dict__ against the class table layout: the layout's values
  // in order, then a map of the rest. If the dict does not start with the
  // layout's keys in order, every layout slot is ABSENT and the map holds the
  // whole dict, so attribute order is always kept.
  bool write_attr_dict(PyObject* dict, PyObject* layout, int depth) {
    Py_ssize_t n = PyTuple_GET_SIZE(layout), size = dict ? PyDict_GET_SIZE(dict) : 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    bool in_order = size >= n;
    for (Py_ssize_t i = 0; in_order && i < n && PyDict_Next(dict, &pos, &k, &v); ++i) {
      PyObject* want = PyTuple_GET_ITEM(layout, i);
      in_order = k == want || (PyUnicode_CheckExact(k) && PyUnicode_Compare(k, want) == 0);
    }
    if (PyErr_Occurred()) return false;
    pos = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!in_order) {
        if (!write_absent()) return false;
        continue;
      }
      if (!PyDict_Next(dict, &pos, &k, &v)) {  // user code emptied it while we wrote
        PyErr_SetString(PyExc_RuntimeError, "instance __dict__ changed size during encoding");
        return false;
      }
      Hold hv(v);
      if (!enc(v, depth)) return attr_segment(k);
    }
    Py_ssize_t rest = in_order ? size - n : size;
    if (!in_order) pos = 0;
    if (!write_map_header(rest, nullptr)) return false;
    while (rest-- > 0 && PyDict_Next(dict, &pos, &k, &v)) {
      Hold hk(k), hv(v);
      if (!enc(k, depth)) return key_segment(k, true);
      if (!enc(v, depth)) return attr_segment(k);
    }
    if (rest >= 0) {
      PyErr_SetString(PyExc_RuntimeError, "instance __dict__ changed size during encoding");
      return false;
    }
    return true;
  }

  bool write_struct(PyObject* o, TypeInfo* info, int depth) {
    size_t start;
    TableEntry* e;
    if (!begin_instance(info, WK_STRUCT, nullptr, &start, &e)) return false;
    Py_ssize_t n = PyTuple_GET_SIZE(info->fields);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* v = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(o) + info->members[i]->offset);
      bool ok;
      if (!v) {
        ok = write_absent();  // an unset field stays unset
      } else {
        Hold hv(v);
        ok = enc(v, depth);
      }
      if (!ok) return attr_segment(PyTuple_GET_ITEM(info->fields, i));
    }
    return end_nested_ext(start);
  }

  bool write_pydantic(PyObject* o, TypeInfo* info, int depth) {
    const PydanticSlots& ps = TypeRegistry::instance().pydantic_slots();
    PyObject* dict = PyObject_GenericGetDict(o, nullptr);
    if (!dict) return false;
    Hold hd(dict);
    Py_DECREF(dict);
    if (!PyDict_Check(dict)) return unsupported(o, "pydantic model whose __dict__ is not a dict");
    size_t start;
    TableEntry* e;
    if (!begin_instance(info, WK_PYDANTIC, dict, &start, &e) || !write_attr_dict(dict, e->layout, depth))
      return false;
    const char* names[] = {".__pydantic_extra__", ".__pydantic_fields_set__", ".__pydantic_private__"};
    PyMemberDef* slots[] = {ps.extra, ps.fields_set, ps.priv};
    for (int i = 0; i < 3; ++i) {
      PyObject* v = PyMember_GetOne(reinterpret_cast<const char*>(o), slots[i]);
      if (!v) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return false;
        PyErr_Clear();  // never set: pydantic's own __getstate__ would fail; travel as None
        v = Py_None;
        Py_INCREF(v);
      }
      bool ok;
      if (i == 1) ok = write_fields_set(v, e->layout, depth);
      else if (i == 2) ok = write_private(v, depth);
      else ok = enc(v, depth);
      Py_DECREF(v);
      if (!ok) {
        path_.push_back(names[i]);
        return false;
      }
    }
    return end_nested_ext(start);
  }

  // __pydantic_fields_set__ as a bit mask over the layout when it can be
  // (it names layout fields almost always), else as the set itself.
  bool write_fields_set(PyObject* s, PyObject* layout, int depth) {
    Py_ssize_t n = PyTuple_GET_SIZE(layout);
    if (PyAnySet_CheckExact(s) && n <= 64) {
      uint64_t mask = 0;
      Py_ssize_t found = 0;
      for (Py_ssize_t i = 0; i < n; ++i) {
        int r = PySet_Contains(s, PyTuple_GET_ITEM(layout, i));
        if (r < 0) return false;
        if (r) mask |= uint64_t(1) << i, ++found;
      }
      if (found == PySet_GET_SIZE(s)) {
        if (!reserve(9)) return false;
        put(UINT64), put_be64(mask);  // always 9 bytes: a set is never written as uint64
        return true;
      }
    }
    return enc(s, depth);
  }

  // pydantic's __getstate__ drops private attributes that were never set.
  bool write_private(PyObject* v, int depth) {
    PyObject* undefined = loaded_attr_borrowed("pydantic_core", "PydanticUndefined");
    if (!PyDict_Check(v) || !undefined || PyDict_GET_SIZE(v) == 0) return enc(v, depth);
    PyObject* d = PyDict_New();
    if (!d) return false;
    Py_ssize_t pos = 0;
    PyObject *k, *x;
    while (PyDict_Next(v, &pos, &k, &x))
      if (x != undefined && PyDict_SetItem(d, k, x) < 0) {
        Py_DECREF(d);
        return false;
      }
    bool ok = enc(d, depth);
    Py_DECREF(d);
    return ok;
  }

  static PyObject* loaded_attr_borrowed(const char* module, const char* name) {
    PyObject* m = PyDict_GetItemString(PyImport_GetModuleDict(), module);
    return m && PyModule_Check(m) ? PyDict_GetItemString(PyModule_GetDict(m), name) : nullptr;
  }

  bool write_plain_object(PyObject* o, TypeInfo* info, int depth) {
    PyObject* dict = nullptr;
    PyObject** dp = _PyObject_GetDictPtr(o);
    if (dp && *dp) dict = *dp;
    else if (dp && PyType_HasFeature(Py_TYPE(o), Py_TPFLAGS_MANAGED_DICT)) {
      dict = PyObject_GenericGetDict(o, nullptr);
      if (!dict) return false;
      Py_DECREF(dict);  // the object keeps it
    }
    if (dict && !PyDict_Check(dict)) return unsupported(o, "instance __dict__ that is not a dict");
    Hold hd(dict ? dict : Py_None);
    size_t start;
    TableEntry* e;
    if (!begin_instance(info, WK_OBJECT, dict, &start, &e) || !write_attr_dict(dict, e->layout, depth)) return false;
    // __slots__ values, as copyreg's default __getstate__ collects them.
    Py_ssize_t ns = PyTuple_GET_SIZE(info->fields);
    if (ns == 0) return reserve(1) && (put(NIL), true) && end_nested_ext(start);
    std::vector<std::pair<PyObject*, PyObject*>> slots;
    bool ok = true;
    for (Py_ssize_t i = 0; ok && i < ns; ++i) {
      PyObject* name = PyTuple_GET_ITEM(info->fields, i);
      PyObject* v = PyObject_GetAttr(o, name);
      if (v) slots.emplace_back(name, v);
      else if (PyErr_ExceptionMatches(PyExc_AttributeError)) PyErr_Clear();
      else ok = false;
    }
    ok = ok && write_map_header(slots.size(), nullptr);
    for (auto& kv : slots) {
      if (ok && !(write_str(kv.first) && enc(kv.second, depth))) ok = attr_segment(kv.first);
      Py_DECREF(kv.second);
    }
    return ok && end_nested_ext(start);
  }

  // A class with its own pickle protocol: asks __reduce_ex__ as pickle does
  // and travels natively if the callable it names is the class itself (or
  // copyreg.__newobj__ of the class). Anything else is pickled if allowed.
  bool write_reduce(PyObject* o, TypeInfo* info, int depth) {
    PyObject* rv = PyObject_CallMethod(o, "__reduce_ex__", "i", 4);
    if (!rv) return false;
    Hold hr(rv);
    Py_DECREF(rv);
    // A pickle fallback of o below (write_pickle) reuses rv; an enclosing
    // write_reduce's object is restored on the way out.
    struct Reduced {
      Encoder& e;
      PyObject* prev_obj;
      PyObject* prev_rv;
      Reduced(Encoder& e, PyObject* obj, PyObject* r) : e(e), prev_obj(e.reduced_obj_), prev_rv(e.reduced_rv_) {
        e.reduced_obj_ = obj;
        e.reduced_rv_ = r;
      }
      ~Reduced() {
        e.reduced_obj_ = prev_obj;
        e.reduced_rv_ = prev_rv;
      }
    } reduced(*this, o, rv);
    Py_ssize_t n = PyTuple_Check(rv) ? PyTuple_GET_SIZE(rv) : 0;
    if (n < 2 || n > 6 || !PyTuple_Check(PyTuple_GET_ITEM(rv, 1)))
      return fallback(o, (std::string("unsupported type ") + Py_TYPE(o)->tp_name +
                          " (its __reduce_ex__ returns a global name)").c_str());
    PyObject* fn = PyTuple_GET_ITEM(rv, 0);
    PyObject* args = PyTuple_GET_ITEM(rv, 1);
    PyObject* state = n > 2 ? PyTuple_GET_ITEM(rv, 2) : Py_None;
    PyObject* listitems = n > 3 ? PyTuple_GET_ITEM(rv, 3) : Py_None;
    PyObject* dictitems = n > 4 ? PyTuple_GET_ITEM(rv, 4) : Py_None;
    if (n > 5 && PyTuple_GET_ITEM(rv, 5) != Py_None)
      return fallback(o, (std::string("unsupported type ") + Py_TYPE(o)->tp_name + " (it pickles with a state setter)").c_str());
    PyObject* cls = reinterpret_cast<PyObject*>(Py_TYPE(o));
    uint8_t newobj = 0;
    Py_ssize_t first = 0;
    PyObject* call_name = nullptr;  // WK_CALL and not yet in this message's table: the callable's wire name
    bool call = false;
    if (fn == loaded_attr_borrowed("copyreg", "__newobj__") && PyTuple_GET_SIZE(args) >= 1 &&
        PyTuple_GET_ITEM(args, 0) == cls) {
      newobj = 1;
      first = 1;
    } else if (fn != cls) {
      // Another callable (a factory, torch's rebuild functions): natively
      // only if receivers may call it, decided here on the source.
      call = true;
      if (!calls_.count(fn)) {
        bool findable;
        call_name = TypeRegistry::instance().callable_name(fn, opts_.trusted, &findable);
        if (!call_name) return refuse_callable(o, fn, findable);
      }
    }
    Hold hn(call_name ? call_name : Py_None);
    Py_XDECREF(call_name);
    if (!call && !TypeRegistry::instance().may_write(info, opts_.trusted)) return refuse_class(o, info, false);
    if (memo_.count(o)) {
      int r = memo(o);  // (reached again through its own __reduce__)
      return r > 0;
    }
    memo_add(o, false);
    uint32_t slot = uint32_t(memo_held_.size() - 1);
    size_t start;
    TableEntry* e;
    bool ok = call ? begin_call(fn, call_name, &start)
                   : begin_instance(info, WK_REDUCE, nullptr, &start, &e) && write_int64(newobj);
    if (!ok || !write_array_header(PyTuple_GET_SIZE(args) - first, nullptr)) return false;
    for (Py_ssize_t i = first; i < PyTuple_GET_SIZE(args); ++i) {
      if (!enc(PyTuple_GET_ITEM(args, i), depth)) {
        path_.push_back(".__reduce__()[1][" + std::to_string(i) + "]");
        return false;
      }
    }
    memo_ready_[slot] = 1;
    if (!enc(state, depth)) {
      path_.push_back(".__getstate__()");
      return false;
    }
    if (!write_items(listitems, false, depth) || !write_items(dictitems, true, depth)) return false;
    return end_nested_ext(start);
  }

  // A WK_CALL instance: the callable's class table entry the first time in
  // this message (`name` is its wire name then), its index after that.
  bool begin_call(PyObject* fn, PyObject* name, size_t* start) {
    auto it = calls_.find(fn);
    if (it != calls_.end()) return begin_nested_ext(EXT_OBJECT, start) && write_int64(it->second);
    Py_INCREF(fn);
    table_.push_back({nullptr, WK_CALL, nullptr, fn});
    calls_.emplace(fn, uint32_t(table_.size() - 1));
    return begin_nested_ext(EXT_OBJECT_DEF, start) && write_array_header(3, nullptr) && write_str(name) &&
           write_int64(WK_CALL) && write_array_header(0, nullptr);
  }

  // A __reduce__ callable receivers would not call. Trusting its module is
  // suggested only where that would help: the callable can be found by its
  // own module and qualname.
  bool refuse_callable(PyObject* o, PyObject* fn, bool findable) {
    if (pending_is_fatal()) return false;
    PyObject* fname = PyObject_GetAttrString(fn, "__qualname__");
    PyObject* fmod = fname ? PyObject_GetAttrString(fn, "__module__") : nullptr;
    std::string what = std::string("unsupported type ") + Py_TYPE(o)->tp_name + " (its pickle protocol rebuilds it with " +
                       utf8_or(fmod, "?") + "." + utf8_or(fname, "a callable") +
                       (findable ? ", which receivers would not call: it is not the class itself, and not under a "
                                   "trusted prefix; trust its module with fastbcast.trust() / trusted=... on every rank"
                                 : ", which receivers could not find by its name");
    Py_XDECREF(fname);
    Py_XDECREF(fmod);
    if (pending_is_fatal()) return false;
    PyErr_Clear();
    if (opts_.allow_pickle && !opts_.compat) return write_pickle(o);
    return unsupported(o, (what + ", or pass allow_pickle=True to send it as a pickle)").c_str());
  }

  // A torch.Tensor subclass (nn.Parameter): the values as a plain tensor
  // (with a memo slot of its own), requires_grad and the instance __dict__,
  // which is what torch's own rebuild functions restore.
  bool write_tensor_subclass(PyObject* o, TypeInfo* info, int depth) {
    PyObject* plain;
    bool grad;
    try {
      const at::Tensor& src = unpack_tensor(o);
      grad = src.requires_grad();
      // pickle rebuilds a plain tensor that requires grad as a leaf, whatever
      // it was; a subclass that is not a leaf it refuses.
      if (grad && !src.is_leaf() && !is_exact_tensor(o))
        return fallback(o, "tensor subclass that requires grad and is not a leaf (pickle refuses it too)");
      plain = wrap_tensor(src.detach());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
      return false;
    }
    if (!plain) return false;
    Hold hp(plain);
    Py_DECREF(plain);
    PyObject* dict = PyObject_GenericGetDict(o, nullptr);
    if (!dict) return false;
    Hold hd(dict);
    Py_DECREF(dict);
    memo_add(o);
    size_t start;
    TableEntry* e;
    if (!begin_instance(info, WK_TENSOR, nullptr, &start, &e)) return false;
    if (!shared_leaf(plain, &Encoder::write_tensor)) return attr_segment_str(".data");
    if (!reserve(1)) return false;
    put(grad ? TRUE_ : FALSE_);
    bool ok = PyDict_GET_SIZE(dict) ? enter(dict, depth) ? write_dict(dict, depth + 1) : too_deep(dict)
                                    : reserve(1) && (put(NIL), true);
    return (ok || attr_segment_str(".__dict__")) && end_nested_ext(start);
  }

  bool attr_segment_str(const char* seg) {
    path_.push_back(seg);
    return false;
  }

  // __reduce_ex__'s list items (an array) or dict items (a map), or nil.
  bool write_items(PyObject* it, bool pairs, int depth) {
    if (it == Py_None) return reserve(1) && (put(NIL), true);
    PyObject* items = PySequence_List(it);
    if (!items) return false;
    Hold hi(items);
    Py_DECREF(items);
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (!(pairs ? write_map_header(n, nullptr) : write_array_header(n, nullptr))) return false;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); ++i) {
      PyObject* x = PyList_GET_ITEM(items, i);
      if (pairs) {
        if (!PyTuple_Check(x) || PyTuple_GET_SIZE(x) != 2) return unsupported(x, "dict item that is not a pair");
        if (!enc(PyTuple_GET_ITEM(x, 0), depth) || !enc(PyTuple_GET_ITEM(x, 1), depth)) return index_segment(i);
      } else if (!enc(x, depth)) {
        return index_segment(i);
      }
    }
    return true;
  }

  // A class object as a value (a defaultdict's factory).
  bool write_class_ref(PyObject* cls) {
    TypeInfo* info = TypeRegistry::instance().for_encode(reinterpret_cast<PyTypeObject*>(cls));
    if (!info) return false;
    if (!TypeRegistry::instance().may_write(info, opts_.trusted)) return refuse_class(cls, info, true);
    size_t start;
    TableEntry* e;
    return begin_instance(info, WK_CLASS, nullptr, &start, &e) && end_nested_ext(start);
  }

  bool write_instance(PyObject* o, TypeInfo* info, int depth) {
    // A __reduce__ is asked first: registering the class only helps if it names the class.
    if (info->kind != Kind::REDUCE && !TypeRegistry::instance().may_write(info, opts_.trusted))
      return refuse_class(o, info, false);
    int r = memo(o);
    if (r) return r > 0;
    if (info->kind == Kind::REDUCE) return write_reduce(o, info, depth);
    if (info->kind == Kind::TENSOR) return write_tensor_subclass(o, info, depth);
    memo_add(o);
    switch (info->kind) {
      case Kind::STRUCT: return write_struct(o, info, depth);
      case Kind::PYDANTIC: return write_pydantic(o, info, depth);
      default: return write_plain_object(o, info, depth);
    }
  }

  // ---- dispatch ---------------------------------------------------------
  // Containers are walked through borrowed references, and a few leaves
  // (class instances, pickles) run user code (__getattr__, __reduce__) that
  // could empty the container holding them. So every container, and every
  // leaf taken by the slow path, holds a reference to itself while it is
  // being written: user code can then mutate, but never free, what the
  // encoder is reading. Plain leaves (str, int, float, bytes) run no code.
  struct Hold {
    PyObject* o;
    explicit Hold(PyObject* x) : o(x) { Py_INCREF(o); }
    ~Hold() { Py_DECREF(o); }
  };

  bool enc(PyObject* o, int depth) {
    PyTypeObject* t = Py_TYPE(o);
    // Most common first: the types of a rollout batch.
    if (t == &PyUnicode_Type) return write_str(o);
    if (t == &PyLong_Type) return write_int(o);
    if (t == &PyList_Type) {
      Hold h(o);
      return enter(o, depth) ? write_list(o, depth + 1) : too_deep(o);
    }
    if (t == &PyDict_Type) {
      Hold h(o);
      return enter(o, depth) ? write_dict(o, depth + 1) : too_deep(o);
    }
    if (t == &PyFloat_Type) return write_float(PyFloat_AS_DOUBLE(o));
    if (o == Py_None) return reserve(1) && (put(NIL), true);
    if (o == Py_True) return reserve(1) && (put(TRUE_), true);
    if (o == Py_False) return reserve(1) && (put(FALSE_), true);
    if (t == &PyTuple_Type) return enter(o, depth) ? write_tuple(o, depth + 1) : too_deep(o);  // immutable
    if (t == &PyBytes_Type) {
      if (size_t(PyBytes_GET_SIZE(o)) >= kMemoBytesMin) {
        int r = memo(o);
        if (r) return r > 0;
        memo_add(o);
      }
      return write_bin(PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o), o);
    }
    Hold h(o);
    return enc_other(o, t, depth);
  }

  bool enc_other(PyObject* o, PyTypeObject* t, int depth) {
    if (t == &PyByteArray_Type) return write_raw(PyByteArray_AS_STRING(o), PyByteArray_GET_SIZE(o), EXT_BYTEARRAY, o);
    if (t == &PyMemoryView_Type) return write_buffer_ext(o, EXT_MEMORYVIEW, nullptr, 0);
    if (t == &PySet_Type) return enter(o, depth) ? write_set(o, depth + 1, EXT_SET) : too_deep(o);
    if (t == &PyFrozenSet_Type) return enter(o, depth) ? write_set(o, depth + 1, EXT_FROZENSET) : too_deep(o);
    if (t == &PyComplex_Type) return write_complex(o);
    if (is_exact_tensor(o)) {
      // The TENSOR ext has no room for requires_grad or attributes set on
      // the tensor (t.tag = ...): such a tensor travels as a kind 7
      // instance of torch.Tensor, which carries both, and arrives as pickle
      // gives it (a leaf, its __dict__ restored).
      const at::Tensor& src = unpack_tensor(o);
      if (FB_LIKELY((!src.requires_grad() && !has_attributes(o)) || opts_.compat))
        return shared_leaf(o, &Encoder::write_tensor);
      TypeInfo* info = TypeRegistry::instance().for_encode(t);
      if (!info) return false;
      return enter(o, depth) ? write_instance(o, info, depth + 1) : too_deep(o);
    }
    if (PyType_Check(o)) return write_class_ref(o);
    TypeInfo* info = TypeRegistry::instance().for_encode(t);
    if (!info) return false;
    switch (info->kind) {
      case Kind::NDARRAY:
        return shared_leaf(o, &Encoder::write_ndarray);
      case Kind::PYARRAY:
        return write_pyarray(o);
      case Kind::NPSCALAR:
        return write_npscalar(o);
      case Kind::STRUCT:
      case Kind::PYDANTIC:
      case Kind::OBJECT:
      case Kind::REDUCE:
      case Kind::TENSOR:
        if (opts_.compat) return unsupported(o, "class instance in compat mode");
        return enter(o, depth) ? write_instance(o, info, depth + 1) : too_deep(o);
      case Kind::UNSUPPORTED:
        break;
    }
    return fallback(o, (std::string("unsupported type ") + t->tp_name).c_str());
  }

  // ---- reference cycles ---------------------------------------------------
  // With pickles allowed, a value holding a cycle through containers travels
  // as one pickle, so receivers get pickle's cycle structure. The walk that
  // found the cycle is undone back to a Mark: bytes, memo slots, class table
  // entries and CUDA tensors written since, none of which the receivers see.
  struct Mark {
    size_t len = 0, memo = 0, table = 0, pickles = 0, cuda = 0;
    uint64_t device_len = 0;
  };
  Mark mark() const {
    return {len_, memo_held_.size(), table_.size(), pickles_, opts_.cuda_tensors ? opts_.cuda_tensors->size() : 0,
            device_len_};
  }
  void rollback(const Mark& m) {
    PyErr_Clear();
    path_.clear();
    cycle_ = cycle_top_ = false;
    len_ = m.len;
    pickles_ = m.pickles;
    device_len_ = m.device_len;
    if (opts_.cuda_tensors) opts_.cuda_tensors->resize(m.cuda);
    while (memo_held_.size() > m.memo) {
      PyObject* o = memo_held_.back();
      memo_.erase(o);
      memo_held_.pop_back();
      memo_ready_.pop_back();
      Py_DECREF(o);
    }
    while (table_.size() > m.table) {
      TableEntry& e = table_.back();
      if (e.info && e.info->msg_epoch == epoch_ && e.info->msg_index >= m.table) e.info->msg_epoch = 0;
      if (e.fn) calls_.erase(e.fn);
      Py_DECREF(e.info ? e.info->cls : e.fn);
      Py_XDECREF(e.layout);
      table_.pop_back();
    }
  }
  bool pickle_whole(PyObject* o, const Mark& m) {
    if (pending_is_fatal()) return false;
    rollback(m);
    return write_pickle(o);
  }
  void cycle_found(PyObject* o) {
    if (!opts_.allow_pickle || opts_.compat) return;
    cycle_ = true;
    // In a session stack_[0] is the top-level container, whose earlier items
    // may be sent already: an item's own pickle would copy it.
    cycle_top_ = o == stack_[0];
    for (int i = 1; i < stopped_at_ && !cycle_top_; ++i) cycle_top_ = stack_[i] == stack_[0];
  }

  // Depth bookkeeping for containers and instances; tells a cycle from deep
  // nesting. False (no error set) when `o` is one level too deep, or the
  // thread's C stack is nearly used up.
  bool enter(PyObject* o, int depth) {
    if (FB_LIKELY(depth < kMaxDepth && guard_.ok())) {
      stack_[depth] = o;
      return true;
    }
    stopped_at_ = depth;
    return false;
  }

  // Past kMaxDepth: a cycle is an error; deep nesting travels as a pickle of
  // the rest of the branch when pickle is allowed, else it is refused. Out of
  // C stack before that: a RecursionError, as pickle gives (pickling the rest
  // would need stack too).
  bool too_deep(PyObject* o) {
    for (int i = 0; i < stopped_at_; ++i) {
      if (stack_[i] == o) {
        cycle_found(o);
        PyErr_Format(PyExc_ValueError, "the object contains a reference cycle (a %s that contains itself)",
                     Py_TYPE(o)->tp_name);
        return false;
      }
    }
    if (stopped_at_ < kMaxDepth) {
      PyErr_Format(PyExc_RecursionError, "nesting too deep for this thread's C stack (%d levels)", stopped_at_);
      return false;
    }
    if (opts_.allow_pickle && !opts_.compat) return write_pickle(o);
    PyErr_Format(PyExc_ValueError, "nesting deeper than %d levels (pass allow_pickle=True to send deeper levels "
                 "as a pickle)", kMaxDepth);
    return false;
  }

  // ---- errors -----------------------------------------------------------
  bool top_failed(bool) {
    if (!pending_is_fatal()) add_path_to_error();
    return false;
  }

  bool unsupported(PyObject* o, const char* what) {
    if (std::strncmp(what, "unsupported", 11) == 0) PyErr_SetString(PyExc_TypeError, what);
    else PyErr_Format(PyExc_TypeError, "unsupported: %s", what);
    return false;
  }

  // Something the codec does not write natively: a pickle if allowed, else a
  // TypeError on the source.
  bool fallback(PyObject* o, const char* what) {
    if (pending_is_fatal()) return false;
    PyErr_Clear();
    if (opts_.allow_pickle && !opts_.compat) return write_pickle(o);
    return unsupported(o, (std::string(what) + " (pass allow_pickle=True to send it as a pickle)").c_str());
  }

  // A class the receivers would not rebuild: decided here, on the source, so
  // no receiver is the first to find out.
  bool refuse_class(PyObject* o, TypeInfo* info, bool as_value) {
    if (opts_.allow_pickle && !opts_.compat) return write_pickle(o);
    std::string name = utf8_or(info->name, Py_TYPE(o)->tp_name);
    std::string hint = info->user_class
                           ? "register it with fastbcast.register(" + std::string(as_value ? "it" : "its class") +
                                 ") on every rank, trust its module (fastbcast.trust() / trusted=...), or pass "
                                 "allow_pickle=True to send it as a pickle"
                           : "pass allow_pickle=True to send it as a pickle";
    PyErr_Format(PyExc_TypeError, "%s %s is not registered or trusted, so receivers would not rebuild it: %s",
                 as_value ? "class" : "instance of", name.c_str(), hint.c_str());
    return false;
  }

  bool too_long(PyObject* o, const char* what) {
    PyErr_Format(PyExc_ValueError, "%s longer than MessagePack allows (2^32-1)", what);
    return false;
  }

  bool attr_segment(PyObject* name) {
    path_.push_back("." + std::string(utf8_or(name, "?")));
    return false;
  }

  bool index_segment(Py_ssize_t i) {
    path_.push_back("[" + std::to_string(i) + "]");
    return false;
  }

  bool key_segment(PyObject* k, bool in_key) {
    path_.push_back(in_key ? "<key " + safe_repr(k) + ">" : "[" + safe_repr(k) + "]");
    return false;
  }

  static std::string safe_repr(PyObject* o) {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    std::string out = "?";
    PyObject* r = PyObject_Repr(o);
    if (r) {
      const char* s = PyUnicode_AsUTF8(r);
      if (s) out = s;
      Py_DECREF(r);
    }
    if (out.size() > 60) out = out.substr(0, 57) + "...";
    if (pending_is_fatal()) {  // a KeyboardInterrupt in __repr__ wins over the error being reported
      Py_XDECREF(et);
      Py_XDECREF(ev);
      Py_XDECREF(tb);
      return out;
    }
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    return out;
  }

  // Prefixes the pending exception's message with the path to the object
  // that failed, e.g. "data[0]['messages'][2].content: unsupported type Foo".
  void add_path_to_error() {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    // Outermost segments first; a very deep path keeps both of its ends.
    std::string path = "data";
    size_t n = path_.size();
    for (size_t i = 0; i < n; ++i) {
      if (n > 16 && i == 8) {
        path += "...";
        i = n - 8;
      }
      path += path_[n - 1 - i];
    }
    PyObject* msg = ev ? PyObject_Str(ev) : nullptr;
    const char* m = msg ? PyUnicode_AsUTF8(msg) : nullptr;
    if (!m) PyErr_Clear();
    PyObject* cls = PyErr_GivenExceptionMatches(et, PyExc_TypeError) ? PyExc_TypeError
                    : PyErr_GivenExceptionMatches(et, PyExc_RecursionError) ? PyExc_RecursionError
                    : PyErr_GivenExceptionMatches(et, PyExc_MemoryError) ? PyExc_MemoryError
                    : PyErr_GivenExceptionMatches(et, PyExc_RuntimeError) ? PyExc_RuntimeError
                                                                          : PyExc_ValueError;
    PyErr_Format(cls, "%s: %s", path.c_str(), m ? m : "encoding failed");
    Py_XDECREF(msg);
    // Keep the original as __cause__ so nothing is lost.
    PyObject *nt, *nv, *ntb;
    PyErr_Fetch(&nt, &nv, &ntb);
    PyErr_NormalizeException(&nt, &nv, &ntb);
    if (ev) {
      PyException_SetCause(nv, ev);  // steals ev
      ev = nullptr;
    }
    PyErr_Restore(nt, nv, ntb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
  }

  const EncodeOptions& opts_;
  at::Tensor block_;
  uint8_t* data_ = nullptr;
  size_t cap_ = 0;
  size_t len_ = 0;
  uint64_t device_len_ = 0;
  std::vector<std::string> path_;
  PyObject* stack_[kMaxDepth];
  int stopped_at_ = 0;  // the depth at which enter() last refused
  StackGuard guard_;
  uint64_t epoch_;
  std::deque<TableEntry> table_;  // a deque: entries stay put while nested instances add more
  std::unordered_map<PyObject*, uint32_t> memo_;
  std::unordered_map<PyObject*, uint32_t> calls_;  // WK_CALL callables -> class table index
  std::vector<PyObject*> memo_held_;     // strong references, one per memo slot
  std::vector<uint8_t> memo_ready_;      // 0 while a __reduce__'s arguments are being written
  size_t pickles_ = 0;                   // pickle exts written so far
  PyObject* reduced_obj_ = nullptr;      // write_reduce's object and its __reduce_ex__ value (borrowed)
  PyObject* reduced_rv_ = nullptr;
  bool cycle_ = false;                   // the walk failed on a reference cycle that may travel as a pickle
  bool cycle_top_ = false;               // ... and the cycle runs through stack_[0]
};

}  // namespace

bool encode_object(PyObject* obj, const EncodeOptions& opts, Encoded* out) {
  Encoder enc(opts);
  return enc.run(obj, out);
}

struct EncoderSession::Impl {
  EncodeOptions opts;
  Encoder enc;
  explicit Impl(const EncodeOptions& o) : opts(o), enc(opts) {}
};

EncoderSession::EncoderSession(const EncodeOptions& opts) : impl_(std::make_unique<Impl>(opts)) {}
EncoderSession::~EncoderSession() = default;
bool EncoderSession::open(size_t min_bytes, size_t room) { return impl_->enc.open_block(min_bytes, room); }
bool EncoderSession::item(PyObject* container, Py_ssize_t index, PyObject* value, bool pickle_cycles) {
  return impl_->enc.top_item(container, index, value, pickle_cycles);
}
bool EncoderSession::pair(PyObject* container, PyObject* key, PyObject* value, bool pickle_cycles) {
  return impl_->enc.top_pair(container, key, value, pickle_cycles);
}
bool EncoderSession::found_cycle() const { return impl_->enc.found_cycle(); }
bool EncoderSession::pickle_whole(PyObject* obj, size_t min_bytes, size_t room) {
  return impl_->enc.pickle_session(obj, min_bytes, room);
}
bool EncoderSession::append(const uint8_t* p, size_t n) { return impl_->enc.append(p, n); }
uint8_t* EncoderSession::data() { return impl_->enc.data(); }
size_t EncoderSession::len() const { return impl_->enc.len(); }
void EncoderSession::truncate(size_t n) { impl_->enc.truncate(n); }
at::Tensor EncoderSession::block() const { return impl_->enc.block(); }
uint64_t EncoderSession::take_device_len() { return impl_->enc.take_device_len(); }

}  // namespace fastbcast
