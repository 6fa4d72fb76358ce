#include "stream.h"

#include <algorithm>
#include <cstring>

#include "pinned_pool.h"

namespace fastbcast {

namespace {

// Where the segment header sits in message `index`.
constexpr size_t segment_at(uint32_t index) {
  return index == 0 ? kHeaderBytes + kStreamPrologueBytes : 0;
}

// Bytes of the container's MessagePack header (container_header).
size_t container_header_len(StreamKind kind, uint64_t n) {
  return (kind == STREAM_TUPLE ? 6 : 0) + (n < 16 ? 1 : n <= 0xffff ? 3 : 5);
}

// The MessagePack header of the whole container, in front of its items in an
// ordinary frame. Returns its length.
size_t container_header(uint8_t* p, StreamKind kind, uint64_t n, size_t body_len) {
  size_t h = 0;
  if (kind == STREAM_TUPLE) {  // the TUPLE ext around an array
    size_t arr = n < 16 ? 1 : n <= 0xffff ? 3 : 5;
    p[h++] = EXT32;
    store_be32(p + h, uint32_t(arr + body_len));
    h += 4;
    p[h++] = uint8_t(EXT_TUPLE);
  }
  const bool map = kind == STREAM_DICT;
  if (n < 16) {
    p[h++] = uint8_t((map ? FIXMAP : FIXARRAY) | n);
  } else if (n <= 0xffff) {
    p[h++] = map ? MAP16 : ARRAY16;
    store_be16(p + h, uint16_t(n));
    h += 2;
  } else {
    p[h++] = map ? MAP32 : ARRAY32;
    store_be32(p + h, uint32_t(n));
    h += 4;
  }
  return h;
}

void write_segment_header(uint8_t* p, uint64_t seg_len, uint64_t device_len, uint32_t index, uint64_t items,
                          uint16_t flags) {
  std::memset(p, 0, kSegmentHeaderBytes);
  store_le<uint64_t>(p, seg_len);
  store_le<uint64_t>(p + 8, device_len);
  store_le<uint32_t>(p + 16, index);
  store_le<uint32_t>(p + 20, uint32_t(items));
  store_le<uint16_t>(p + 24, flags);
}

}  // namespace

// ---- source ---------------------------------------------------------------

StreamEncoder::StreamEncoder(PyObject* obj, uint64_t segment_bytes, const EncodeOptions& opts, bool collect_cuda,
                             uint64_t first_segment)
    : obj_(obj),
      segment_bytes_(std::clamp<uint64_t>(segment_bytes, kMinSegmentBytes, kMaxSegmentBytes)),
      first_segment_(first_segment ? std::clamp<uint64_t>(first_segment, kMinSegmentBytes, segment_bytes_) : 0),
      compat_(opts.compat),
      session_([&] {
        EncodeOptions o = opts;
        o.cuda_tensors = collect_cuda ? &cuda_ : nullptr;
        return o;
      }()) {
  Py_INCREF(obj_);
  PyTypeObject* t = Py_TYPE(obj);
  kind_ = t == &PyDict_Type ? STREAM_DICT : t == &PyTuple_Type && !compat_ ? STREAM_TUPLE : STREAM_LIST;
  n_ = uint64_t(Py_SIZE(obj));
  if (t == &PyDict_Type) n_ = uint64_t(PyDict_GET_SIZE(obj));
}

StreamEncoder::~StreamEncoder() { Py_DECREF(obj_); }

bool StreamEncoder::encode_next() {
  PyObject* o = obj_;
  if (kind_ == STREAM_DICT) {
    PyObject *k, *v;
    if (uint64_t(PyDict_GET_SIZE(o)) != n_ || !PyDict_Next(o, &dict_pos_, &k, &v)) {
      PyErr_SetString(PyExc_RuntimeError, "dict changed size during encoding");
      return false;
    }
    ++next_;
    return session_.pair(o, k, v, index_ > 0);
  }
  Py_ssize_t i = Py_ssize_t(next_++);
  if (PyList_CheckExact(o)) {
    if (i >= PyList_GET_SIZE(o)) {
      PyErr_SetString(PyExc_RuntimeError, "list changed size during encoding");
      return false;
    }
    return session_.item(o, i, PyList_GET_ITEM(o, i), index_ > 0);
  }
  return session_.item(o, i, PyTuple_GET_ITEM(o, i), index_ > 0);
}

// Fills the current block with items until the message reaches
// segment_bytes. An item that takes it past segment_bytes moves to the next
// segment's block (unless it is the segment's only item, or it collected
// CUDA tensors, whose device-buffer offsets belong to this segment), so a
// segment exceeds segment_bytes only when one item alone does.
bool StreamEncoder::segment(size_t min_bytes, size_t room, StreamMessage* out) {
  if (!open_ && !session_.open(min_bytes, room)) return false;
  open_ = false;
  uint64_t items = std::exchange(carried_, 0);
  size_t carry_from = 0;
  while (next_ < n_) {
    size_t before = session_.len();
    size_t n_cuda = cuda_.size();
    if (!encode_next()) return false;
    ++items;
    if (session_.len() >= target()) {
      if (session_.len() > target() && items > 1 && cuda_.size() == n_cuda) carry_from = before;
      break;
    }
  }
  return close(items, carry_from, out);
}

bool StreamEncoder::close(uint64_t items, size_t carry_from, StreamMessage* out) {
  out->block = session_.block();
  out->len = carry_from ? carry_from : session_.len();
  out->device_len = session_.take_device_len();
  out->cuda = std::move(cuda_);
  cuda_.clear();
  if (carry_from) {
    size_t end = session_.len();
    if (!session_.open(segment_bytes_, kSegmentHeaderBytes) ||
        !session_.append(out->block.data_ptr<uint8_t>() + carry_from, end - carry_from))
      return false;
    open_ = true;
    carried_ = 1;
    --items;
  }
  out->items = items;
  out->last = next_ == n_ && !open_;
  return true;
}

// Message 0 starts as an ordinary frame (the container's header, then its
// items), so a container that ends within segment_bytes costs what
// encode_object would. Only when it passes segment_bytes with items left do
// the items move behind the prologue and segment header.
bool StreamEncoder::first(FrameHeader h, uint16_t version, size_t min_capacity, StreamMessage* out,
                          bool* streaming) {
  if (n_ > 0xffffffffULL) {
    PyErr_SetString(PyExc_ValueError, "container longer than MessagePack allows (2^32-1)");
    return false;
  }
  const size_t body_at = kHeaderBytes + container_header_len(kind_, n_);
  const size_t shift = kStreamBodyOffset - body_at;  // what streaming adds in front of the items
  if (!session_.open(min_capacity, body_at)) return false;
  size_t before = body_at, n_cuda = 0;
  uint64_t items = 0;
  while (next_ < n_) {
    before = session_.len();
    n_cuda = cuda_.size();
    if (!encode_next()) {
      if (!session_.found_cycle()) return false;
      // Nothing is sent yet: the whole value goes as one pickle, an
      // ordinary frame, as encode_object writes it.
      cuda_.clear();
      if (!session_.pickle_whole(obj_, min_capacity, kHeaderBytes)) return false;
      *streaming = false;
      out->block = session_.block();
      out->len = session_.len();
      out->device_len = 0;
      out->items = 1;
      out->last = true;
      h.flags = 0;
      h.device_len = 0;
      h.payload_len = out->len - kHeaderBytes;
      write_header(out->block.data_ptr<uint8_t>(), h, version);
      return true;
    }
    ++items;
    if (session_.len() + shift >= target() && next_ < n_) break;
  }
  *streaming = next_ < n_;
  if (!*streaming) {
    out->block = session_.block();
    out->len = session_.len();
    out->device_len = session_.take_device_len();
    out->cuda = std::move(cuda_);
    out->items = items;
    out->last = true;
    uint8_t* d = out->block.data_ptr<uint8_t>();
    container_header(d + kHeaderBytes, kind_, n_, out->len - body_at);
    h.flags = out->cuda.empty() ? 0 : FLAG_CUDA;
    h.device_len = out->device_len;
    h.payload_len = out->len - kHeaderBytes;
    write_header(d, h, version);
    return true;
  }
  const size_t end = session_.len();
  static const uint8_t kZeros[kStreamBodyOffset] = {};
  if (!session_.append(kZeros, shift)) return false;
  std::memmove(session_.data() + kStreamBodyOffset, session_.data() + body_at, end - body_at);
  before += shift;
  bool carry = session_.len() > target() && items > 1 && cuda_.size() == n_cuda;
  if (!close(items, carry ? before : 0, out)) return false;
  uint8_t* d = out->block.data_ptr<uint8_t>();
  h.flags = (out->cuda.empty() ? 0 : FLAG_CUDA) | FLAG_STREAM;
  h.device_len = out->device_len;
  h.payload_len = out->len - kHeaderBytes;
  write_header(d, h, version);
  uint8_t* pro = d + kHeaderBytes;
  std::memset(pro, 0, kStreamPrologueBytes);
  pro[0] = kind_;
  store_le<uint32_t>(pro + 4, uint32_t(segment_bytes_));
  store_le<uint64_t>(pro + 8, n_);
  write_segment_header(d + segment_at(0), out->len - segment_at(0), out->device_len, 0, out->items,
                       out->cuda.empty() ? 0 : SEG_CUDA);
  index_ = 1;
  return true;
}

bool StreamEncoder::next(StreamMessage* out) {
  if (!segment(segment_bytes_, kSegmentHeaderBytes, out)) return false;
  uint16_t flags = (out->last ? SEG_LAST : 0) | (out->cuda.empty() ? 0 : SEG_CUDA);
  write_segment_header(out->block.data_ptr<uint8_t>(), out->len, out->device_len, index_++, out->items, flags);
  return true;
}

StreamMessage StreamEncoder::error_segment(const std::string& message, bool unsent) {
  if (unsent && index_ > 1) --index_;
  StreamMessage m;
  size_t n = std::min<size_t>(message.size(), size_t(64) << 10);
  size_t cap = std::max<size_t>(segment_bytes_, kSegmentHeaderBytes + n);
  try {
    m.block = PinnedPool::instance().acquire(cap);
  } catch (const c10::Error&) {
    m.block = at::zeros({int64_t(cap)}, at::kByte);
  }
  uint8_t* d = m.block.data_ptr<uint8_t>();
  write_segment_header(d, kSegmentHeaderBytes + n, 0, index_++, 0, SEG_ERROR | SEG_LAST);
  std::memcpy(d + kSegmentHeaderBytes, message.data(), n);
  m.len = kSegmentHeaderBytes + n;
  m.last = true;
  return m;
}

// ---- receivers ------------------------------------------------------------

StreamDecoder::StreamDecoder(const DecodeOptions& opts) : session_(opts) {}

StreamDecoder::~StreamDecoder() { Py_XDECREF(out_); }

bool StreamDecoder::fail(const std::string& what) {
  PyErr_Format(decode_error_type(), "stream segment %u: %s", index_, what.c_str());
  return false;
}

bool StreamDecoder::open(const uint8_t* frame, size_t frame_len, uint64_t payload_len) {
  if (payload_len < kStreamPrologueBytes + kSegmentHeaderBytes || frame_len < kStreamBodyOffset)
    return fail("message 0 is shorter than the stream prologue and segment header");
  const uint8_t* p = frame + kHeaderBytes;
  uint8_t kind = p[0];
  segment_bytes_ = load_le<uint32_t>(p + 4);
  n_ = load_le<uint64_t>(p + 8);
  if (kind > STREAM_DICT) return fail("unknown stream kind " + std::to_string(kind));
  if (segment_bytes_ < kMinSegmentBytes || segment_bytes_ > kMaxSegmentBytes)
    return fail("segment_bytes " + std::to_string(segment_bytes_) + " is outside [" +
                std::to_string(kMinSegmentBytes) + ", " + std::to_string(kMaxSegmentBytes) + "]");
  if (n_ > 0xffffffffULL) return fail("a stream of " + std::to_string(n_) + " items");
  kind_ = StreamKind(kind);
  out_ = kind_ == STREAM_DICT ? PyDict_New() : PyList_New(0);
  if (!out_) return false;
  msg_len_ = kHeaderBytes + payload_len;
  return true;
}

bool StreamDecoder::segment(const uint8_t* msg, size_t avail, uint64_t* message_len, uint64_t* device_len,
                            uint16_t* flags) {
  if (done_) return fail("a segment after the last one");
  const size_t at = segment_at(index_);
  if (avail < at + kSegmentHeaderBytes) return fail("message shorter than its segment header");
  const uint8_t* h = msg + at;
  uint64_t seg_len = load_le<uint64_t>(h);
  uint64_t dev = load_le<uint64_t>(h + 8);
  uint32_t index = load_le<uint32_t>(h + 16);
  uint64_t items = load_le<uint32_t>(h + 20);
  uint16_t f = load_le<uint16_t>(h + 24);
  if (index != index_) return fail("segment " + std::to_string(index) + " arrived (a segment was skipped or repeated)");
  if (seg_len < kSegmentHeaderBytes || seg_len > (uint64_t(1) << 48) || dev > (uint64_t(1) << 48))
    return fail("impossible segment length " + std::to_string(seg_len) + " / device length " + std::to_string(dev));
  if (index_ == 0 && at + seg_len != msg_len_)
    return fail("segment 0 says " + std::to_string(seg_len) + " bytes, message 0 holds " +
                std::to_string(msg_len_ - at));
  if (f & SEG_ERROR) {
    f |= SEG_LAST;
  } else {
    if (items > n_ - decoded_)
      return fail(std::to_string(items) + " items, past the stream's " + std::to_string(n_));
    if (items > seg_len - kSegmentHeaderBytes) return fail(std::to_string(items) + " items in fewer bytes");
    if ((f & SEG_LAST) && decoded_ + items != n_)
      return fail("the last segment ends the stream after " + std::to_string(decoded_ + items) + " of its " +
                  std::to_string(n_) + " items");
    decoded_ += items;
  }
  base_ += msg_len_ * (index_ > 0);
  msg_len_ = at + seg_len;
  body_ = at + kSegmentHeaderBytes;
  body_len_ = seg_len - kSegmentHeaderBytes;
  items_ = items;
  ++index_;
  done_ = f & SEG_LAST;
  *message_len = msg_len_;
  *device_len = dev;
  *flags = f;
  return true;
}

bool StreamDecoder::whole(size_t avail) {
  if (avail >= msg_len_) return true;
  --index_;
  return fail("message of " + std::to_string(avail) + " bytes, its segment header says " + std::to_string(msg_len_));
}

bool StreamDecoder::decode(const uint8_t* msg, size_t avail, const at::Tensor* device_buffer) {
  if (!whole(avail)) return false;
  return session_.values(msg + body_, body_len_, base_ + body_, items_, out_, device_buffer);
}

std::string StreamDecoder::error_text(const uint8_t* msg, size_t avail) const {
  size_t n = std::min(body_len_, avail > body_ ? avail - body_ : 0);
  return std::string(reinterpret_cast<const char*>(msg + body_), n);
}

PyObject* StreamDecoder::result() {
  if (!done_ || PyObject_Length(out_) != Py_ssize_t(n_)) {
    PyErr_Format(decode_error_type(), "stream ended with %zd of its %llu items", PyObject_Length(out_),
                 (unsigned long long)n_);
    return nullptr;
  }
  if (kind_ == STREAM_TUPLE) return PyList_AsTuple(out_);
  Py_INCREF(out_);
  return out_;
}

}  // namespace fastbcast
