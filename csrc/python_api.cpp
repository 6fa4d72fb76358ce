// Every pybind11 binding of fastbcast._C. The Python package (fastbcast/)
// wraps these in documented functions; nothing here is public API by itself.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <string>

#include "decoder.h"
#include "encoder.h"
#include "frame.h"
#include "group_collective.h"
#include "pinned_pool.h"
#include "stream.h"
#include "type_registry.h"
#include "wire.h"

namespace py = pybind11;

namespace fastbcast {
void bind_shm(py::module_& m);  // the shared-memory block at the end of this file
void bind_collective(py::module_& m);  // the collective transport's one-call path, after it
void bind_stream(py::module_& m);  // streamed frames, after encode/decode
}

namespace fastbcast {
namespace {

py::object steal(PyObject* o) {
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

const at::Tensor& host_bytes(const py::handle& o, const char* what) {
  if (!THPVariable_Check(o.ptr())) throw py::type_error(std::string(what) + " must be a torch.Tensor");
  const at::Tensor& t = THPVariable_Unpack(o.ptr());
  if (!t.is_cpu() || t.scalar_type() != at::kByte || !t.is_contiguous())
    throw py::value_error(std::string(what) + " must be a contiguous CPU uint8 tensor, got " +
                          c10::toString(t.scalar_type()) + " on " + t.device().str() +
                          (t.is_contiguous() ? "" : " (non-contiguous)"));
  return t;
}

PyObject* trusted_tuple(const py::object& trusted) {
  if (trusted.is_none()) return nullptr;
  if (!PyTuple_Check(trusted.ptr())) throw py::type_error("trusted must be a tuple of module prefixes");
  return trusted.ptr();
}

EncodeOptions encode_options(bool compat, bool allow_pickle, const py::object& trusted) {
  EncodeOptions o;
  o.compat = compat;
  o.allow_pickle = allow_pickle;
  o.trusted = trusted_tuple(trusted);
  return o;
}

Encoded encode_or_throw(PyObject* obj, const EncodeOptions& opts) {
  Encoded e;
  if (!encode_object(obj, opts, &e)) throw py::error_already_set();
  return e;
}

DecodeOptions decode_options(bool allow_pickle, const py::object& trusted) {
  DecodeOptions o;
  o.allow_pickle = allow_pickle;
  o.trusted = trusted_tuple(trusted);
  return o;
}

py::object encode(py::handle obj, bool compat, bool allow_pickle, const py::object& trusted) {
  Encoded e = encode_or_throw(obj.ptr(), encode_options(compat, allow_pickle, trusted));
  return steal(THPVariable_Wrap(e.block.narrow(0, 0, int64_t(e.len))));
}

// Encodes into a pool block first, so a buffer that turns out too small is
// left untouched. Returns (fits, size): the bytes written, or needed.
py::tuple encode_into(py::handle obj, py::handle out, int64_t offset, bool compat, bool allow_pickle,
                      const py::object& trusted) {
  const at::Tensor& dst = host_bytes(out, "out");
  if (offset < 0 || offset > dst.numel())
    throw py::value_error("offset " + std::to_string(offset) + " is outside the " + std::to_string(dst.numel()) +
                          "-byte buffer");
  Encoded e = encode_or_throw(obj.ptr(), encode_options(compat, allow_pickle, trusted));
  if (int64_t(e.len) > dst.numel() - offset) return py::make_tuple(false, e.len);
  std::memcpy(dst.data_ptr<uint8_t>() + offset, e.block.data_ptr<uint8_t>(), e.len);
  return py::make_tuple(true, e.len);
}

py::object decode(py::handle buf, bool allow_pickle, const py::object& trusted) {
  DecodeOptions opts = decode_options(allow_pickle, trusted);
  if (THPVariable_Check(buf.ptr())) {
    const at::Tensor& t = host_bytes(buf, "buf");
    return steal(decode_object(t.data_ptr<uint8_t>(), size_t(t.numel()), opts));
  }
  Py_buffer view;
  if (PyObject_GetBuffer(buf.ptr(), &view, PyBUF_C_CONTIGUOUS) < 0) {
    PyErr_Clear();
    throw py::type_error("decode() takes a uint8 torch.Tensor, bytes, bytearray or a contiguous memoryview");
  }
  PyObject* o = decode_object(static_cast<const uint8_t*>(view.buf), size_t(view.len), opts);
  PyBuffer_Release(&view);
  return steal(o);
}

// The source side of a broadcast: header + value in one pool block of at
// least min_capacity bytes (or in *scratch while it fits scratch_limit).
// CUDA tensors go to *cuda when it is given. `trusted` is what the receivers
// trust: the source writes natively only classes they may rebuild.
Encoded encode_frame_block(PyObject* obj, uint32_t first_chunk, uint32_t chunk, uint16_t version, uint64_t seq,
                           bool compat, bool allow_pickle, size_t min_capacity, const py::object& trusted,
                           std::vector<at::Tensor>* cuda, std::vector<uint8_t>* scratch = nullptr,
                           size_t scratch_limit = 0) {
  EncodeOptions opts = encode_options(compat, allow_pickle, trusted);
  opts.reserve = kHeaderBytes;
  opts.min_capacity = min_capacity;
  opts.cuda_tensors = cuda;
  opts.scratch = scratch;
  opts.scratch_limit = scratch_limit;
  Encoded e = encode_or_throw(obj, opts);
  FrameHeader h;
  h.flags = cuda && !cuda->empty() ? FLAG_CUDA : 0;
  h.payload_len = e.len - kHeaderBytes;
  h.first_chunk = first_chunk;
  h.chunk = chunk;
  h.device_len = e.device_len;
  h.seq = seq;
  write_header(e.data, h, version);
  return e;
}

// A frame a channel's send_object encoded but does not send, as
// encode_frame_or_stream returns it for the caller's general path: a frame
// still in the channel's scratch moves to a pool block of at least
// min_block bytes.
py::tuple unsent_frame(Encoded& e, const std::vector<at::Tensor>& cuda, size_t min_block) {
  if (!e.block.defined()) {
    e.block = PinnedPool::instance().acquire(std::max(e.len, min_block));
    std::memcpy(e.block.data_ptr<uint8_t>(), e.data, e.len);
  }
  py::list tensors;
  for (auto& t : cuda) tensors.append(steal(THPVariable_Wrap(t)));
  return py::make_tuple(steal(THPVariable_Wrap(e.block)), e.len, tensors, e.device_len, py::none());
}

// Returns (block, frame_bytes, cuda_tensors, device_len), and a fifth item,
// None, with stream_slot (encode_frame_or_stream's shape).
py::tuple encode_frame(py::handle obj, uint32_t first_chunk, uint32_t chunk, uint16_t version, uint64_t seq,
                       bool compat, bool allow_pickle, bool collect_cuda, size_t min_capacity,
                       const py::object& trusted, bool stream_slot = false) {
  std::vector<at::Tensor> cuda;
  Encoded e = encode_frame_block(obj.ptr(), first_chunk, chunk, version, seq, compat, allow_pickle, min_capacity,
                                 trusted, collect_cuda ? &cuda : nullptr);
  py::list tensors;
  for (auto& t : cuda) tensors.append(steal(THPVariable_Wrap(t)));
  if (stream_slot) return py::make_tuple(steal(THPVariable_Wrap(e.block)), e.len, tensors, e.device_len, py::none());
  return py::make_tuple(steal(THPVariable_Wrap(e.block)), e.len, tensors, e.device_len);
}

// A frame that tells receivers the source failed: the ERROR flag and the
// message (UTF-8, cut to max_bytes) as payload, in a buffer of at least
// min_capacity bytes. When the pool is at its cap (often the very reason the
// encode failed) the frame is built in ordinary memory: receivers are
// already waiting for it.
py::tuple error_frame(const std::string& message, uint32_t first_chunk, uint32_t chunk, uint16_t version,
                      uint64_t seq, size_t max_bytes, size_t min_capacity) {
  if (max_bytes < kHeaderBytes) throw py::value_error("an error frame needs room for its header");
  size_t n = std::min(message.size(), max_bytes - kHeaderBytes);
  size_t cap = std::max(min_capacity, kHeaderBytes + n);
  at::Tensor block;
  try {
    block = PinnedPool::instance().acquire(cap);
  } catch (const c10::Error&) {
    block = at::zeros({int64_t(cap)}, at::kByte);
  }
  FrameHeader h;
  h.flags = FLAG_ERROR;
  h.payload_len = n;
  h.first_chunk = first_chunk;
  h.chunk = chunk;
  h.seq = seq;
  write_header(block.data_ptr<uint8_t>(), h, version);
  std::memcpy(block.data_ptr<uint8_t>() + kHeaderBytes, message.data(), n);
  return py::make_tuple(steal(THPVariable_Wrap(block)), kHeaderBytes + n);
}

// (version, flags, frame_len, payload_len, first_chunk, chunk, device_len,
// seq); for a frame of another version only version, flags, frame_len,
// first_chunk, chunk and device_len are read (the rest is 0).
py::tuple read_header_py(py::handle buf, uint16_t version) {
  const at::Tensor& t = host_bytes(buf, "header");
  FrameHeader h;
  std::string err;
  if (!read_header(t.data_ptr<uint8_t>(), size_t(t.numel()), version, &h, &err)) {
    PyErr_SetString(decode_error_type(), err.c_str());
    throw py::error_already_set();
  }
  return py::make_tuple(h.version, h.flags, h.frame_len, h.payload_len, h.first_chunk, h.chunk, h.device_len, h.seq);
}

const uint8_t* frame_payload(const at::Tensor& t, uint64_t payload_len) {
  // Compared without adding to payload_len, which comes off the wire and
  // could wrap the sum.
  if (uint64_t(t.numel()) < kHeaderBytes || payload_len > uint64_t(t.numel()) - kHeaderBytes)
    throw py::value_error("frame buffer shorter than header + payload");
  return t.data_ptr<uint8_t>() + kHeaderBytes;
}

py::object decode_frame(py::handle buf, uint64_t payload_len, const py::object& device_buffer, bool allow_pickle,
                        const py::object& trusted) {
  const at::Tensor& t = host_bytes(buf, "frame");
  const uint8_t* payload = frame_payload(t, payload_len);
  DecodeOptions opts = decode_options(allow_pickle, trusted);
  at::Tensor dev;
  if (!device_buffer.is_none()) {
    if (!THPVariable_Check(device_buffer.ptr())) throw py::type_error("device_buffer must be a tensor");
    dev = THPVariable_Unpack(device_buffer.ptr());
    opts.device_buffer = &dev;
  }
  return steal(decode_object(payload, payload_len, opts, kHeaderBytes));
}

// The UTF-8 message of an error frame.
py::str frame_message(py::handle buf, uint64_t payload_len) {
  const at::Tensor& t = host_bytes(buf, "frame");
  const char* p = reinterpret_cast<const char*>(frame_payload(t, payload_len));
  return steal(PyUnicode_DecodeUTF8(p, Py_ssize_t(payload_len), "replace"));
}

py::object pack_device(const py::list& tensors, uint64_t device_len, const py::object& device) {
  std::vector<at::Tensor> ts;
  for (auto& o : tensors) ts.push_back(THPVariable_Unpack(o.ptr()));
  return steal(THPVariable_Wrap(pack_device_buffer(ts, device_len, py::cast<at::Device>(device))));
}

// ---- streamed frames (stream.h) ----
// The Python objects a stream's options borrow are held next to it.
struct PyStreamEncoder {
  py::object obj, trusted;
  std::unique_ptr<StreamEncoder> enc;
};

struct PyStreamDecoder {
  py::object trusted;
  std::unique_ptr<StreamDecoder> dec;
};

py::tuple message_tuple(StreamMessage& m, bool flag) {
  py::list tensors;
  for (auto& t : m.cuda) tensors.append(steal(THPVariable_Wrap(t)));
  return py::make_tuple(steal(THPVariable_Wrap(m.block)), m.len, tensors, m.device_len, flag);
}

StreamMessage stream_first(PyStreamEncoder& s, uint32_t first_chunk, uint32_t chunk, uint16_t version, uint64_t seq,
                           size_t min_capacity, bool* streaming) {
  FrameHeader h;
  h.first_chunk = first_chunk;
  h.chunk = chunk;
  h.seq = seq;
  StreamMessage msg;
  if (!s.enc->first(h, version, min_capacity, &msg, streaming)) throw py::error_already_set();
  return msg;
}

py::object stream_or_none(std::unique_ptr<PyStreamEncoder> s, bool streaming) {
  if (!streaming) return py::none();
  return py::cast(s.release(), py::return_value_policy::take_ownership);
}

// encode_frame_or_stream's answer: (block, frame_bytes, cuda_tensors,
// device_len, the encoder of the rest or None).
py::tuple first_tuple(StreamMessage& msg, std::unique_ptr<PyStreamEncoder> s, bool streaming) {
  py::tuple m = message_tuple(msg, false);
  return py::make_tuple(m[0], m[1], m[2], m[3], stream_or_none(std::move(s), streaming));
}

// Whether obj may become a stream: a list (not of ints), tuple or dict of two
// items or more, and streaming is on (stream_bytes not 0).
bool streamable(PyObject* o, uint64_t stream_bytes) {
  PyTypeObject* t = Py_TYPE(o);
  return stream_bytes &&
         ((t == &PyList_Type && PyList_GET_SIZE(o) > 1 && !PyLong_CheckExact(PyList_GET_ITEM(o, 0))) ||
          (t == &PyTuple_Type && PyTuple_GET_SIZE(o) > 1) || (t == &PyDict_Type && PyDict_GET_SIZE(o) > 1));
}

// encode_frame, or message 0 of a stream (FORMAT.md section 3.1) when obj is
// a list (not of ints), tuple or dict of two items or more and stream_bytes
// is not 0. Returns (block, frame_bytes, cuda_tensors, device_len, stream):
// stream is the StreamEncoder of the messages still to send, None when the
// frame is an ordinary one.
py::tuple encode_frame_or_stream(py::handle obj, uint64_t stream_bytes, uint32_t first_chunk, uint32_t chunk,
                                 uint16_t version, uint64_t seq, bool compat, bool allow_pickle, bool collect_cuda,
                                 size_t min_capacity, const py::object& trusted, uint64_t first_segment = 0) {
  PyObject* o = obj.ptr();
  if (!streamable(o, stream_bytes)) {
    return encode_frame(obj, first_chunk, chunk, version, seq, compat, allow_pickle, collect_cuda, min_capacity,
                        trusted, true);
  }
  auto s = std::make_unique<PyStreamEncoder>(PyStreamEncoder{py::reinterpret_borrow<py::object>(obj), trusted, nullptr});
  s->enc = std::make_unique<StreamEncoder>(o, stream_bytes, encode_options(compat, allow_pickle, s->trusted),
                                           collect_cuda, first_segment);
  bool streaming = false;
  StreamMessage msg = stream_first(*s, first_chunk, chunk, version, seq, min_capacity, &streaming);
  return first_tuple(msg, std::move(s), streaming);
}

const at::Tensor* device_or_null(const py::object& device_buffer, at::Tensor* keep) {
  if (device_buffer.is_none()) return nullptr;
  if (!THPVariable_Check(device_buffer.ptr())) throw py::type_error("device_buffer must be a tensor");
  *keep = THPVariable_Unpack(device_buffer.ptr());
  return keep;
}

}  // namespace

void bind_stream(py::module_& m) {
  py::class_<PyStreamEncoder>(m, "StreamEncoder", "The source's side of a streamed frame (csrc/stream.h)")
      .def(py::init([](py::handle obj, uint64_t segment_bytes, bool compat, bool allow_pickle, bool collect_cuda,
                       const py::object& trusted, uint64_t first_segment) {
             PyTypeObject* t = Py_TYPE(obj.ptr());
             if (t != &PyList_Type && t != &PyTuple_Type && t != &PyDict_Type)
               throw py::type_error("a stream carries an exact list, tuple or dict");
             auto* s = new PyStreamEncoder{py::reinterpret_borrow<py::object>(obj), trusted, nullptr};
             s->enc = std::make_unique<StreamEncoder>(obj.ptr(), segment_bytes,
                                                      encode_options(compat, allow_pickle, s->trusted), collect_cuda,
                                                      first_segment);
             return s;
           }),
           py::arg("obj"), py::arg("segment_bytes"), py::arg("compat") = false, py::arg("allow_pickle") = false,
           py::arg("collect_cuda") = false, py::arg("trusted") = py::none(), py::arg("first_segment") = 0)
      .def(
          "first",
          [](PyStreamEncoder& s, uint32_t first_chunk, uint32_t chunk, uint16_t version, uint64_t seq,
             size_t min_capacity) {
            bool streaming = false;
            StreamMessage msg = stream_first(s, first_chunk, chunk, version, seq, min_capacity, &streaming);
            return message_tuple(msg, streaming);
          },
          py::arg("first_chunk"), py::arg("chunk"), py::arg("version"), py::arg("seq"), py::arg("min_capacity"),
          "Message 0: (block, nbytes, cuda_tensors, device_len, streaming); not streaming: an ordinary frame.")
      .def(
          "next",
          [](PyStreamEncoder& s) {
            StreamMessage msg;
            if (!s.enc->next(&msg)) throw py::error_already_set();
            return message_tuple(msg, msg.last);
          },
          "The next segment: (block, nbytes, cuda_tensors, device_len, last).")
      .def(
          "error_segment",
          [](PyStreamEncoder& s, const std::string& message, bool unsent) {
            StreamMessage msg = s.enc->error_segment(message, unsent);
            return py::make_tuple(steal(THPVariable_Wrap(msg.block)), msg.len);
          },
          py::arg("message"), py::arg("unsent") = false,
          "A segment that ends the stream with an error: (block, nbytes). unsent: the segment next() returned "
          "last was not sent, and this one takes its index.")
      .def_property_readonly("segment_bytes", [](PyStreamEncoder& s) { return s.enc->segment_bytes(); });

  py::class_<PyStreamDecoder>(m, "StreamDecoder", "A receiver's side of a streamed frame (csrc/stream.h)")
      .def(py::init([](py::handle frame, uint64_t payload_len, bool allow_pickle, const py::object& trusted) {
             const at::Tensor& t = host_bytes(frame, "frame");
             auto* s = new PyStreamDecoder{trusted, nullptr};
             s->dec = std::make_unique<StreamDecoder>(decode_options(allow_pickle, s->trusted));
             if (!s->dec->open(t.data_ptr<uint8_t>(), size_t(t.numel()), payload_len)) {
               delete s;
               throw py::error_already_set();
             }
             return s;
           }),
           py::arg("frame"), py::arg("payload_len"), py::arg("allow_pickle") = false, py::arg("trusted") = py::none())
      .def_property_readonly("segment_bytes", [](PyStreamDecoder& s) { return s.dec->segment_bytes(); })
      .def(
          "segment",
          [](PyStreamDecoder& s, py::handle buf) {
            const at::Tensor& t = host_bytes(buf, "message");
            uint64_t len, dev;
            uint16_t flags;
            if (!s.dec->segment(t.data_ptr<uint8_t>(), size_t(t.numel()), &len, &dev, &flags))
              throw py::error_already_set();
            return py::make_tuple(len, dev, flags);
          },
          py::arg("buf"), "The next segment's header, from its message's first bytes: (message_len, device_len, flags).")
      .def(
          "decode",
          [](PyStreamDecoder& s, py::handle buf, const py::object& device_buffer) {
            const at::Tensor& t = host_bytes(buf, "message");
            at::Tensor keep;
            if (!s.dec->decode(t.data_ptr<uint8_t>(), size_t(t.numel()), device_or_null(device_buffer, &keep)))
              throw py::error_already_set();
          },
          py::arg("buf"), py::arg("device_buffer") = py::none())
      .def(
          "error_text",
          [](PyStreamDecoder& s, py::handle buf) {
            const at::Tensor& t = host_bytes(buf, "message");
            std::string text = s.dec->error_text(t.data_ptr<uint8_t>(), size_t(t.numel()));
            return steal(PyUnicode_DecodeUTF8(text.data(), Py_ssize_t(text.size()), "replace"));
          },
          py::arg("buf"))
      .def("result", [](PyStreamDecoder& s) { return steal(s.dec->result()); });
  m.def("encode_frame_or_stream", &encode_frame_or_stream, py::arg("obj"), py::arg("stream_bytes"),
        py::arg("first_chunk"), py::arg("chunk"), py::arg("version"), py::arg("seq") = 0, py::arg("compat") = false,
        py::arg("allow_pickle") = false, py::arg("collect_cuda") = false, py::arg("min_capacity") = 0,
        py::arg("trusted") = py::none(), py::arg("first_segment") = 0);
  m.attr("SHM_FIRST_SEGMENT_BYTES") = kShmFirstSegmentBytes;
  m.attr("FLAG_STREAM") = int(FLAG_STREAM);
  m.attr("SEG_ERROR") = int(SEG_ERROR);
  m.attr("SEG_LAST") = int(SEG_LAST);
  m.attr("SEG_CUDA") = int(SEG_CUDA);
  // The bytes of a stream's message 0 up to its first item: all a receiver
  // needs to follow (and drain) the rest of the stream.
  m.attr("STREAM_PREFIX_BYTES") = kStreamBodyOffset;
}

namespace {

py::dict pool_stats() {
  PoolStats s = PinnedPool::instance().stats();
  py::dict d;
  d["blocks"] = s.blocks;
  d["bytes"] = s.bytes;
  d["busy_blocks"] = s.busy_blocks;
  d["busy_bytes"] = s.busy_bytes;
  d["limit"] = s.limit;
  d["allocations"] = s.allocations;
  d["pinned"] = s.pinned;
  d["mode"] = s.mode;
  d["min_block"] = PinnedPool::kMinBlock;
  return d;
}

py::dict build_info() {
  py::dict d;
  d["version"] = FASTBCAST_VERSION;
#ifdef FASTBCAST_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["python"] = PY_VERSION;
  d["header_bytes"] = kHeaderBytes;
  d["max_depth"] = kMaxDepth;
  d["int_block_min"] = kIntBlockMin;
  d["device_align"] = kDeviceAlign;
#if defined(__SANITIZE_ADDRESS__)
  d["sanitize"] = true;
#else
  d["sanitize"] = false;
#endif
  return d;
}

}  // namespace
}  // namespace fastbcast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastbcast;
  m.doc() = "fastbcast C++ core: MessagePack codec over a pinned pool, and broadcast frames";

  PyObject* err = PyErr_NewExceptionWithDoc(
      "fastbcast.DecodeError",
      "Raised for bytes that are not a valid fastbcast encoding (truncated, corrupt, hostile, or naming a "
      "class that is not trusted). A ValueError; the message names the byte offset.",
      PyExc_ValueError, nullptr);
  if (!err) throw py::error_already_set();
  set_decode_error_type(err);
  m.attr("DecodeError") = py::reinterpret_steal<py::object>(err);

  m.def("encode", &encode, py::arg("obj"), py::arg("compat") = false, py::arg("allow_pickle") = false,
        py::arg("trusted") = py::none());
  m.def("encode_into", &encode_into, py::arg("obj"), py::arg("out"), py::arg("offset") = 0,
        py::arg("compat") = false, py::arg("allow_pickle") = false, py::arg("trusted") = py::none());
  m.def("decode", &decode, py::arg("buf"), py::arg("allow_pickle") = false, py::arg("trusted") = py::none());
  m.def("encode_frame",
        [](py::handle obj, uint32_t first_chunk, uint32_t chunk, uint16_t version, uint64_t seq, bool compat,
           bool allow_pickle, bool collect_cuda, size_t min_capacity, const py::object& trusted) {
          return encode_frame(obj, first_chunk, chunk, version, seq, compat, allow_pickle, collect_cuda, min_capacity,
                              trusted);
        },
        py::arg("obj"), py::arg("first_chunk"), py::arg("chunk"), py::arg("version"),
        py::arg("seq") = 0, py::arg("compat") = false, py::arg("allow_pickle") = false,
        py::arg("collect_cuda") = false, py::arg("min_capacity") = 0, py::arg("trusted") = py::none());
  m.def("error_frame", &error_frame, py::arg("message"), py::arg("first_chunk"), py::arg("chunk"),
        py::arg("version"), py::arg("seq") = 0, py::arg("max_bytes") = size_t(64) << 10, py::arg("min_capacity") = 0);
  m.def("read_header", &read_header_py, py::arg("buf"), py::arg("version"));
  m.def("decode_frame", &decode_frame, py::arg("buf"), py::arg("payload_len"), py::arg("device_buffer") = py::none(),
        py::arg("allow_pickle") = false, py::arg("trusted") = py::none());
  m.def("frame_message", &frame_message, py::arg("buf"), py::arg("payload_len"));
  m.def("pack_device", &pack_device, py::arg("tensors"), py::arg("device_len"), py::arg("device"));

  m.def("register", [](py::handle cls) {
    if (!TypeRegistry::instance().register_class(cls.ptr())) throw py::error_already_set();
  });
  m.def("trust", [](const std::string& prefix) {
    if (prefix.empty()) throw py::value_error("empty module prefix would trust every module");
    TypeRegistry::instance().add_trusted_prefix(prefix);
  });
  m.def("registered", []() { return steal(TypeRegistry::instance().registered_names()); });

  m.def("pool_acquire", [](size_t n) { return steal(THPVariable_Wrap(PinnedPool::instance().acquire(n))); },
        py::arg("nbytes"));
  m.def("pool_stats", &pool_stats);
  m.def("shrink_pool", []() { return PinnedPool::instance().shrink(); });
  m.def("set_pool_limit", [](size_t bytes) { PinnedPool::instance().set_limit(bytes); });
  m.def("build_info", &build_info);

  m.attr("HEADER_BYTES") = kHeaderBytes;
  m.attr("FIXED_HEADER_BYTES") = kFixedHeaderBytes;
  m.attr("FLAG_ERROR") = int(FLAG_ERROR);
  m.attr("FLAG_CUDA") = int(FLAG_CUDA);
  m.attr("DEVICE_ALIGN") = kDeviceAlign;
  bind_stream(m);
  bind_shm(m);
  bind_collective(m);
}

// ---- shared-memory ring (shm_ring.h, shm_channel.h) ----
#include <pybind11/stl.h>

#include <chrono>
#include <deque>
#include <optional>

#include "shm_channel.h"

namespace fastbcast {
namespace {

PyObject* g_shm_peer_error = nullptr;
PyObject* g_shm_timeout_error = nullptr;
PyObject* g_not_inline = nullptr;  // recv_object's "use recv()" answer, kept for the life of the process

// Read when a wait first outlasts a slice, not once per process: a short
// wait never looks, and a test can change it between waits.
double shm_warn_interval_s() {
  const char* s = std::getenv("FASTBCAST_SHM_WARN_S");
  double d = s && *s ? std::atof(s) : 10.0;
  return d > 0 ? d : 10.0;
}

// A blocked wait gives the interpreter a look in every slice: a pending
// signal (Ctrl-C) ends the wait with its exception, and a wait past
// FASTBCAST_SHM_WARN_S is logged once per interval on logger "fastbcast".
WaitPolicy shm_policy(const std::optional<double>& timeout_s) {
  WaitPolicy p;
  p.timeout_s = timeout_s ? std::max(*timeout_s, 0.0) : -1.0;
  auto next_warn = std::make_shared<double>(-1.0);
  p.on_slice = [next_warn](const WaitInfo& w) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw ShmInterrupted();
    if (*next_warn < 0) *next_warn = shm_warn_interval_s();
    if (w.waited_s >= *next_warn) {
      *next_warn = w.waited_s + shm_warn_interval_s();
      std::string msg = w.describe() + " after " + std::to_string(int(w.waited_s)) + " s";
      try {
        py::module_::import("logging").attr("getLogger")("fastbcast").attr("warning")("%s", msg);
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("fastbcast shm long-wait log");
      }
    }
  };
  return p;
}

// Runs f without the GIL; a signal seen during it re-raises its exception.
template <class F>
auto without_gil(F f) -> decltype(f()) {
  try {
    py::gil_scoped_release nogil;
    return f();
  } catch (const ShmInterrupted&) {
    throw py::error_already_set();
  }
}

}  // namespace

// A call's timeout_s bounds the whole call, from its start: each wait gets
// what is left of it.
struct CallClock {
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  WaitPolicy p;
  explicit CallClock(const std::optional<double>& timeout_s) : p(shm_policy(timeout_s)) {}
  WaitPolicy left() const {
    WaitPolicy q = p;
    if (p.timeout_s >= 0)
      q.timeout_s = std::max(
          0.0, p.timeout_s - std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    return q;
  }
  // A send past the call's timeout (an encode took it) sends nothing: a
  // free slot, or a gloo root's broadcast, would otherwise take it.
  bool passed(const WaitPolicy& q) const { return p.timeout_s >= 0 && q.timeout_s <= 0; }
};

[[noreturn]] void raise_object(const py::object& e) {
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(e.ptr())), e.ptr());
  throw py::error_already_set();
}

// A stream (FORMAT.md section 3.1) sent whole by its source: message 0
// (`msg`, within max_bytes) and every later message, each handed to
// pipe.send as soon as it is encoded; a segment's CUDA tensors go to
// b._stream_send_device(tensors, device_len, route, deadline) after its
// message. An encode that fails, or messages past max_bytes, end the stream
// with an error segment (text, and for max_bytes the exception, from
// b._stream_cut(route, error or None, bytes so far, last)); then
// b._told_receivers is set and the error raised: the group stays in step.
// pipe.finish() waits for what is still moving; until it returns,
// pipe.in_stream(true) has the channel say a failure is the send's.
template <typename Pipe>
void send_stream(Pipe& pipe, StreamEncoder& enc, StreamMessage msg, uint64_t max_bytes, py::handle b,
                 py::handle route, py::handle deadline) {
  auto publish = [&](const StreamMessage& m) {
    pipe.send(m);
    if (m.device_len) {
      py::list tensors;
      for (auto& t : m.cuda) tensors.append(steal(THPVariable_Wrap(t)));
      b.attr("_stream_send_device")(tensors, m.device_len, route, deadline);
    }
  };
  pipe.in_stream(true);
  uint64_t sent = msg.len - kHeaderBytes + msg.device_len;  // as max_bytes counts it
  publish(msg);
  for (bool last = false; !last;) {
    msg = StreamMessage();  // back to the pool before the next is encoded
    const bool made = enc.next(&msg);
    if (made) {
      sent += msg.len + msg.device_len;
      last = msg.last;
      if (sent <= max_bytes) {
        publish(msg);
        continue;
      }
    }
    std::optional<py::error_already_set> raised;
    if (!made) raised.emplace();
    msg = StreamMessage();  // past max_bytes: not sent, the error segment takes its index
    py::tuple cut = b.attr("_stream_cut")(route, raised ? raised->value() : py::none(), sent, last);
    publish(enc.error_segment(cut[1].cast<std::string>(), made));
    pipe.finish();
    pipe.in_stream(false);
    b.attr("_told_receivers") = true;
    if (raised) {
      raised->restore();
      throw py::error_already_set();
    }
    raise_object(cut[0]);
  }
  pipe.finish();
  pipe.in_stream(false);
}

// Shared memory: each message is one ring message, published at once (the
// ring holds up to its slot count ahead of the slowest reader).
struct ShmPipe {
  ShmChannel& c;
  const CallClock& clock;
  void send(const StreamMessage& m) {
    const WaitPolicy q = clock.left();
    // The send fails, the group is given up and its readers see the ring closed.
    if (clock.passed(q))
      throw ShmTimedOut("fastbcast: the source's encode used the call's timeout; the rest of the stream was not sent");
    without_gil([&] { c.send(m.block.data_ptr<uint8_t>(), m.len, q); });
  }
  void finish() {}
  void in_stream(bool on) { c.set_in_stream(on); }
};

// What a receiver has taken of a stream so far (FORMAT.md section 3.1), on
// either transport: each message is decoded, or noted as the failure that
// ends the decoding (the rest is followed, not kept), and the first failure
// is raised only once every message is in.
struct StreamFollower {
  StreamDecoder& dec;
  uint64_t max_bytes;
  py::handle b, route;
  std::optional<py::error_already_set> decode_error;
  py::object failure;
  bool over = false, error_end = false;
  // Bytes of every message so far; max_bytes counts them less message 0's
  // frame header (every sum stays far below 2^64: lengths are < 2^48).
  uint64_t got = 0;

  bool following() const { return !failure && !decode_error && !over; }
  bool fits(uint64_t msg_len, uint64_t device_len) const {
    return got + msg_len + device_len - kHeaderBytes <= max_bytes;
  }
  // The message whose segment header was read last, avail bytes of it at msg.
  void take(const uint8_t* msg, uint64_t avail, uint64_t msg_len, uint64_t device_len, uint16_t flags,
            at::Tensor* device) {
    const bool keep = following(), fit = fits(msg_len, device_len);
    got += msg_len + device_len;
    error_end = flags & SEG_ERROR;
    if (!keep) return;
    if (error_end)
      failure = b.attr("_stream_failure")("error", py::str(dec.error_text(msg, avail)), route);
    else if (!fit)
      over = true;
    else if (!dec.decode(msg, avail, device))
      decode_error.emplace();
  }
  // The stream is over: the first failure raised, else the container.
  py::object outcome() {
    if (decode_error) {
      decode_error->restore();
      throw py::error_already_set();
    }
    if (over)
      failure = b.attr("_stream_failure")(
          "max_bytes", error_end ? py::object(py::none()) : py::object(py::int_(got - kHeaderBytes)), route);
    if (failure) raise_object(failure);
    PyObject* out = dec.result();
    if (!out) throw py::error_already_set();
    return steal(out);
  }
};

// A stream (FORMAT.md section 3.1) whose message 0 the reader has taken
// (in place, or `copied` out of several slots, its prologue only past
// max_bytes), decoded message by message straight from the ring: the
// receive rules of shared-memory streams live here only. Every message is
// taken whatever happens, so the source is never left waiting; once a
// failure is known the rest is drained (a message longer than a slot is
// then not copied). At the end, a call number other than `seq` raises
// through b._check_seq(source's, route); else the first failure is raised:
// a segment's DecodeError, or the exception b._stream_failure(kind, detail,
// route) returns for the source's error segment ("error", its text) or a
// stream past max_bytes ("max_bytes", its size, None if the source cut it
// off). A corrupt segment header leaves nothing to follow the stream by:
// ("corrupt", why) at once. Segments with CUDA tensors get their device
// buffer from b._stream_device(nbytes, route, deadline).
// Releases the slot a reader holds however the scope is left: a reader that
// fails to decode must not block the writer.
struct ReleaseOnExit {
  ShmChannel& c;
  ~ReleaseOnExit() { c.release(); }
};

py::object recv_stream_inline(ShmChannel& c, const uint8_t* data, uint64_t len, at::Tensor copied,
                              const FrameHeader& h, uint64_t seq, uint64_t max_bytes, const DecodeOptions& opts,
                              const CallClock& clock, py::handle b, py::handle route, py::handle deadline) {
  ReleaseOnExit held{c};
  auto corrupt = [&]() {
    py::error_already_set e;
    raise_object(b.attr("_stream_failure")("corrupt", py::str(e.value()), route));
  };
  StreamDecoder dec(opts);
  if (!dec.open(data, len, h.payload_len)) corrupt();
  StreamFollower f{dec, max_bytes, b, route};
  const uint8_t* msg = data;
  uint64_t avail = len;
  for (;;) {
    uint64_t msg_len = 0, device_len = 0;
    uint16_t flags = 0;
    if (!dec.segment(msg, avail, &msg_len, &device_len, &flags)) corrupt();
    at::Tensor device;
    if (flags & SEG_CUDA) device = THPVariable_Unpack(b.attr("_stream_device")(device_len, route, deadline).ptr());
    f.take(msg, avail, msg_len, device_len, flags, device.defined() ? &device : nullptr);
    c.release();
    copied = at::Tensor();
    if (flags & SEG_LAST) break;
    uint64_t next_len = 0;
    const WaitPolicy q = clock.left();
    msg = without_gil([&] { return c.peek(q, &next_len); });
    if (msg) {
      c.take_inline();
      avail = next_len;
    } else {
      const bool keep = f.following() && f.fits(next_len, 0);
      copied = without_gil([&] { return keep ? c.recv(q) : c.recv(q, 0, kSegmentHeaderBytes); });
      msg = copied.data_ptr<uint8_t>();
      avail = uint64_t(copied.numel());
    }
  }
  if (h.seq != seq) b.attr("_check_seq")(h.seq, route);  // raises: another call's stream, followed to its end
  return f.outcome();
}

void bind_shm(py::module_& m) {
  g_shm_peer_error = PyErr_NewExceptionWithDoc(
      "fastbcast.ShmPeerError",
      "A peer of a shared-memory channel died, closed its end or vanished while this rank waited for it. A "
      "RuntimeError; the message names the peer's global rank, its role and what was being waited for.",
      PyExc_RuntimeError, nullptr);
  g_shm_timeout_error = PyErr_NewExceptionWithDoc(
      "fastbcast.ShmTimeoutError",
      "A shared-memory channel wait passed its timeout_s. A TimeoutError; the message names the rank waited for, "
      "the slot and the direction.",
      PyExc_TimeoutError, nullptr);
  if (!g_shm_peer_error || !g_shm_timeout_error) throw py::error_already_set();
  m.attr("ShmPeerError") = py::reinterpret_steal<py::object>(g_shm_peer_error);
  m.attr("ShmTimeoutError") = py::reinterpret_steal<py::object>(g_shm_timeout_error);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ShmPeerDied& e) {
      PyErr_SetString(g_shm_peer_error, e.what());
    } catch (const ShmTimedOut& e) {
      PyErr_SetString(g_shm_timeout_error, e.what());
    } catch (const ShmCorrupt& e) {
      PyErr_SetString(decode_error_type(), e.what());
    } catch (const ShmOSError& e) {
      PyObject* args = Py_BuildValue("(is)", e.err, e.what());
      if (args) PyErr_SetObject(PyExc_OSError, args);
      Py_XDECREF(args);
    }
  });
  g_not_inline = py::module_::import("builtins").attr("object")().release().ptr();
  m.attr("SHM_NOT_INLINE") = py::reinterpret_borrow<py::object>(g_not_inline);
  m.attr("SHM_DEFAULT_SLOTS") = kShmDefaultSlots;
  m.attr("SHM_DEFAULT_SLOT_BYTES") = kShmDefaultSlotBytes;

  using Ch = ShmChannel;
  py::class_<Ch, std::shared_ptr<Ch>>(m, "ShmChannel",
                                      "One writer's shared-memory ring to its readers: csrc/shm_ring.h (layout, ordering, waiting), csrc/shm_channel.h (messages)")
      .def_static("create", &Ch::create, py::arg("name"), py::arg("ranks"), py::arg("pids"), py::arg("n_slots"),
                  py::arg("slot_bytes"))
      .def_static(
          "attach",
          [](const std::string& name, int reader, const std::vector<int>& ranks, const std::vector<int>& pids,
             std::optional<double> timeout_s) {
            WaitPolicy p = shm_policy(timeout_s);
            return without_gil([&] { return Ch::attach(name, reader, ranks, pids, p); });
          },
          py::arg("name"), py::arg("reader"), py::arg("ranks"), py::arg("pids"), py::arg("timeout_s") = py::none())
      .def(
          "wait_attached",
          [](Ch& c, std::optional<double> timeout_s) {
            WaitPolicy p = shm_policy(timeout_s);
            without_gil([&] { c.ring().wait_attached(p); });
          },
          py::arg("timeout_s") = py::none())
      .def("unlink", [](Ch& c) { c.ring().unlink(); })
      .def(
          "send",
          [](Ch& c, py::handle buf, int64_t nbytes, std::optional<double> timeout_s) {
            const at::Tensor& t = host_bytes(buf, "buf");
            if (nbytes < 0 || nbytes > t.numel())
              throw py::value_error("nbytes " + std::to_string(nbytes) + " is outside the " +
                                    std::to_string(t.numel()) + "-byte buffer");
            const uint8_t* data = t.data_ptr<uint8_t>();
            WaitPolicy p = shm_policy(timeout_s);
            without_gil([&] { c.send(data, uint64_t(nbytes), p); });
          },
          py::arg("buf"), py::arg("nbytes"), py::arg("timeout_s") = py::none())
      .def(
          "recv",
          [](Ch& c, std::optional<double> timeout_s, std::optional<uint64_t> max_len, std::optional<uint64_t> prefix) {
            WaitPolicy p = shm_policy(timeout_s);
            at::Tensor t = without_gil(
                [&] { return c.recv(p, max_len.value_or(UINT64_MAX), prefix.value_or(max_len.value_or(0))); });
            return steal(THPVariable_Wrap(t));
          },
          py::arg("timeout_s") = py::none(), py::arg("max_len") = py::none(), py::arg("prefix") = py::none(),
          "The next message. One longer than max_len (and than a slot) is drained: its first `prefix` bytes "
          "(default max_len) come back, the rest is released uncopied.")
      .def(
          "send_object",
          [](Ch& c, py::handle obj, uint64_t stream_bytes, uint32_t first_chunk, uint32_t chunk, uint16_t version,
             uint64_t seq, bool compat, bool allow_pickle, bool collect_cuda, const py::object& trusted,
             uint64_t max_bytes, std::optional<double> timeout_s, py::handle b, py::handle route,
             py::handle deadline) -> py::object {
            // The per-step path: encode and send in one call, with no tensor
            // made for a frame. A frame that needs more than one slot,
            // carries CUDA tensors or is over max_bytes, and a stream whose
            // message 0 is over max_bytes (or any stream without `b`), come
            // back as encode_frame_or_stream's tuple, unsent, for the
            // caller's general path.
            const CallClock clock(timeout_s);
            c.set_in_stream(false);   // a stream that threw in Python code left it set
            const uint64_t slot = c.ring().slot_bytes();
            std::vector<at::Tensor> cuda;
            Encoded e;
            if (streamable(obj.ptr(), stream_bytes)) {
              // Streams use at most a slot as their segment, so readers
              // decode each message in place, and start small.
              auto s = std::make_unique<PyStreamEncoder>(
                  PyStreamEncoder{py::reinterpret_borrow<py::object>(obj), trusted, nullptr});
              s->enc = std::make_unique<StreamEncoder>(obj.ptr(), std::min(stream_bytes, slot),
                                                       encode_options(compat, allow_pickle, s->trusted), collect_cuda,
                                                       kShmFirstSegmentBytes);
              bool streaming = false;
              StreamMessage msg = stream_first(*s, first_chunk, chunk, version, seq, 0, &streaming);
              const bool within = msg.len - kHeaderBytes + msg.device_len <= max_bytes;
              if (streaming && within && !b.is_none()) {
                ShmPipe pipe{c, clock};
                send_stream(pipe, *s->enc, std::move(msg), max_bytes, b, route, deadline);
                return py::none();
              }
              if (streaming || !msg.cuda.empty() || msg.len > slot || !within)
                return first_tuple(msg, std::move(s), streaming);
              e.block = msg.block;
              e.data = msg.block.data_ptr<uint8_t>();
              e.len = msg.len;
            } else {
              e = encode_frame_block(obj.ptr(), first_chunk, chunk, version, seq, compat, allow_pickle, 0, trusted,
                                     collect_cuda ? &cuda : nullptr, &c.scratch(), slot);
              if (e.len > slot || !cuda.empty() || e.len - kHeaderBytes > max_bytes) return unsent_frame(e, cuda, 0);
            }
            const WaitPolicy q = clock.left();
            if (clock.passed(q))
              throw ShmTimedOut("fastbcast: the encode used the call's timeout; nothing was sent");
            without_gil([&] { c.send(e.data, e.len, q); });
            return py::none();
          },
          py::arg("obj"), py::arg("stream_bytes"), py::arg("first_chunk"), py::arg("chunk"), py::arg("version"),
          py::arg("seq"), py::arg("compat"), py::arg("allow_pickle"), py::arg("collect_cuda"), py::arg("trusted"),
          py::arg("max_bytes"), py::arg("timeout_s") = py::none(), py::arg("broadcaster") = py::none(),
          py::arg("route") = py::none(), py::arg("deadline") = py::none(),
          "Encodes obj as a frame (arguments as encode_frame_or_stream; a stream's segments are at most a slot) "
          "and sends it, returning None, if it fits one slot, has no CUDA tensors and is within max_bytes, or if "
          "it is a stream whose message 0 is within max_bytes and `broadcaster` is given (send_stream: every "
          "message, calling the broadcaster's _stream_send_device/_stream_cut with route and deadline). "
          "Otherwise returns encode_frame_or_stream's (block, frame_bytes, cuda_tensors, device_len, stream), "
          "unsent. Encode errors before anything is sent raise; `sending` tells a failure of the send itself "
          "apart.")
      .def_property_readonly("sending", &Ch::sending,
                             "True if the last send, or the stream send_object was sending, did not finish: a "
                             "failure then is the send's, not the encoder's.")
      .def(
          "recv_object",
          [](Ch& c, uint16_t version, uint64_t seq, uint64_t max_bytes, bool allow_pickle, const py::object& trusted,
             std::optional<double> timeout_s, py::handle b, py::handle route, py::handle deadline) -> py::object {
            // The per-step path: a plain frame of this version and call
            // number that sits in one slot is decoded straight from the
            // ring, and (with `b`) a stream of this version is followed
            // whole. Anything else (an error or CUDA frame, another version
            // or call number, a longer or oversized frame) stays pending and
            // SHM_NOT_INLINE is returned: recv() then hands it to the
            // caller's general path, which says what is wrong.
            const CallClock clock(timeout_s);
            uint64_t len = 0;
            const uint8_t* head = nullptr;
            const uint8_t* data = without_gil([&] { return c.peek(clock.p, &len, &head); });
            FrameHeader h;
            std::string err;
            if (!read_header(head, std::min(len, c.ring().slot_bytes()), version, &h, &err) || h.version != version)
              return py::reinterpret_borrow<py::object>(g_not_inline);
            DecodeOptions opts = decode_options(allow_pickle, trusted);
            if ((h.flags & FLAG_STREAM) && !b.is_none()) {
              at::Tensor copied;
              if (data) {
                c.take_inline();
              } else {
                // Message 0 spans slots: copied out, as ShmTransport.recv
                // does; past max_bytes only its prologue, to follow by.
                const WaitPolicy q = clock.left();
                copied = without_gil([&] { return c.recv(q, max_bytes + kHeaderBytes, kStreamBodyOffset); });
                data = copied.data_ptr<uint8_t>();
                len = uint64_t(copied.numel());
              }
              return recv_stream_inline(c, data, len, std::move(copied), h, seq, max_bytes, opts, clock, b, route,
                                        deadline);
            }
            if (!data || h.flags != 0 || h.seq != seq || h.frame_len != len || h.payload_len > max_bytes)
              return py::reinterpret_borrow<py::object>(g_not_inline);
            c.take_inline();
            ReleaseOnExit done{c};
            return steal(decode_object(data + kHeaderBytes, h.payload_len, opts, kHeaderBytes));
          },
          py::arg("version"), py::arg("seq"), py::arg("max_bytes"), py::arg("allow_pickle"), py::arg("trusted"),
          py::arg("timeout_s") = py::none(), py::arg("broadcaster") = py::none(), py::arg("route") = py::none(),
          py::arg("deadline") = py::none(),
          "Decodes the next message in place if it is a plain frame of this version and call number in one slot, "
          "or (with `broadcaster`) follows a stream of this version, message 0 in one slot or several, decoding "
          "every message as it comes (recv_stream_inline: the broadcaster's _stream_device/_stream_failure/"
          "_check_seq get route and deadline). Anything else stays pending and SHM_NOT_INLINE is returned.")
      .def("release", &Ch::release)
      .def("close", &Ch::close)
      .def_property_readonly("n_slots", [](Ch& c) { return c.ring().n_slots(); })
      .def_property_readonly("slot_bytes", [](Ch& c) { return c.ring().slot_bytes(); })
      .def_property_readonly("n_readers", [](Ch& c) { return c.ring().n_readers(); })
      .def_property_readonly("is_writer", [](Ch& c) { return c.ring().is_writer(); })
      .def_property_readonly("name", [](Ch& c) { return c.ring().name(); })
      .def_property_readonly(
          "wait_stats",
          [](Ch& c) {
            const WaitStats& s = c.ring().stats();
            py::dict d;
            d["futex_waits"] = s.futex_waits;
            d["futex_timeouts"] = s.futex_timeouts;
            d["timeout_wakes"] = s.timeout_wakes;
            d["futex_wakes"] = s.futex_wakes;
            return d;
          },
          "Process-local counters: FUTEX_WAIT calls, those ended by their timeout slice, timed-out slices after "
          "which the awaited condition held (a wake only the fallback delivered), FUTEX_WAKE calls.")
      .def(
          "_inject",
          [](Ch& c, py::bytes header, bool publish) {
            std::string h = header;
            c.ring().inject(reinterpret_cast<const uint8_t*>(h.data()), h.size(), publish);
          },
          py::arg("header"), py::arg("publish"),
          "Test hook: overwrite the next slot's header with these bytes; publish it as the next slot if asked.");
}


// ---- the collective transport's one-call path (group_collective.h) ----
namespace {
PyObject* g_collective_error = nullptr;
}

// A host buffer of at least n bytes: a pool block, or ordinary memory once
// the pool's cap is reached (a rank that cannot join a collective would
// leave its peers waiting).
at::Tensor host_block(size_t n) {
  try {
    return PinnedPool::instance().acquire(n);
  } catch (const c10::Error&) {
    return at::empty({int64_t(n)}, at::TensorOptions(at::kByte));
  }
}

// A source's stream over a CPU group's collective: each message's
// collectives are posted without waiting (message 0 as any frame: a first
// collective of first_chunk bytes; every later one a first collective of
// segment_bytes, which receivers post before they know its length), then
// collectives of `chunk` bytes; at most two messages are in flight,
// so the source encodes the next while receivers take these. Posts are
// made without the GIL (see recv_stream_collective), and from tensors
// Python never saw: a gloo worker dropping them needs no GIL.
struct CollectivePipe {
  GroupCollective& g;
  const StreamEncoder& enc;
  const CallClock& clock;
  uint32_t n = 0;  // messages posted
  std::deque<std::pair<at::Tensor, std::vector<c10::intrusive_ptr<c10d::Work>>>> inflight;

  WaitPolicy in_time() const {
    const WaitPolicy q = clock.left();
    if (clock.passed(q)) throw CollectiveFailed("RuntimeError", "timed out: the call's timeout passed mid-stream");
    return q;
  }
  c10::intrusive_ptr<c10d::Work> post(const at::Tensor& t) {
    return without_gil([&] { return g.post(t, g.root); });
  }
  void send(const StreamMessage& m) {
    in_time();
    if (inflight.size() >= 2) finish_one();
    // Message 0 as any frame; every later one's first collective moves
    // segment_bytes whatever its length: receivers post it before they know it.
    const uint64_t first = n ? enc.segment_bytes() : g.first_chunk();
    at::Tensor block = m.block;
    if (uint64_t(block.numel()) < first) {  // the first collective moves `first` bytes whatever the length
      at::Tensor bigger = host_block(first);
      std::memcpy(bigger.data_ptr<uint8_t>(), block.data_ptr<uint8_t>(), m.len);
      block = bigger;
    }
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.push_back(post(block.narrow(0, 0, int64_t(first))));
    for (uint64_t off = first; off < m.len; off += g.chunk()) {
      in_time();  // posting many tiny chunks takes time too
      works.push_back(post(block.narrow(0, int64_t(off), int64_t(std::min<uint64_t>(g.chunk(), m.len - off)))));
    }
    inflight.emplace_back(std::move(block), std::move(works));
    ++n;
  }
  void finish_one() {
    auto works = std::move(inflight.front().second);
    for (auto& w : works) {
      const WaitPolicy q = in_time();
      without_gil([&] { GroupCollective::wait_for(w, q.timeout_s); });
    }
    inflight.pop_front();  // the block may go back to the pool
  }
  void finish() {
    while (!inflight.empty()) finish_one();
  }
  void in_stream(bool on) { g.sending = g.streaming = on; }
};

// A stream (FORMAT.md section 3.1) over a CPU group's collective, received
// and decoded by one call, as recv_stream_inline does over shared memory:
// the loop of fastbcast.stream.receive without its Python (about 25 us a
// message, BENCHMARKS.md section 5c). `frame` is message 0 (whole, or only
// its first STREAM_PREFIX_BYTES when it alone is over max_bytes), `s` opened
// on it. Each later message moves in a first collective of segment_bytes,
// posted before the message in front of it is decoded, and past that in collectives of the
// source's `chunk`. Every message is received before anything is raised:
// b._stream_failure's exception for an error segment, a stream over
// max_bytes or a corrupt segment header, a segment's DecodeError; a
// collective that fails or passes the call's timeout throws
// CollectiveFailed at once (the group is then given up).
py::object recv_stream_collective(GroupCollective& g, PyStreamDecoder& s, at::Tensor frame, uint64_t max_bytes,
                                  uint32_t chunk, const CallClock& clock, py::handle b, py::handle route,
                                  py::handle deadline) {
  StreamDecoder& dec = *s.dec;
  auto corrupt = [&]() {
    py::error_already_set e;
    raise_object(b.attr("_stream_failure")("corrupt", py::str(e.value()), route));
  };
  auto in_time = [&]() {
    const WaitPolicy q = clock.left();
    if (clock.passed(q)) throw CollectiveFailed("RuntimeError", "timed out: the call's timeout passed mid-stream");
    return q;
  };
  // Without the GIL, as torch's own binding: a gloo worker that drops a
  // finished collective's tensors may need the GIL while it holds the queue
  // that a post waits for.
  auto post_one = [&](const at::Tensor& t) { return without_gil([&] { return g.post(t, g.root); }); };
  auto wait = [&](const c10::intrusive_ptr<c10d::Work>& w) {
    const WaitPolicy q = in_time();
    without_gil([&] { GroupCollective::wait_for(w, q.timeout_s); });
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  };
  const uint64_t segment = dec.segment_bytes();
  // The next message is posted before this one is decoded, into the other
  // of two buffers; message 0's is one of them. With a chunk below the
  // segment that second buffer would pass the bound of one segment plus
  // one chunk (FORMAT.md 3.1): then one buffer, posted after the decode.
  const bool ahead = g.chunk() >= segment;
  at::Tensor host[2];
  if (uint64_t(frame.numel()) >= segment) host[1] = frame;
  uint32_t posted = 0;  // messages after message 0 posted so far
  int pending_j = 0;
  c10::intrusive_ptr<c10d::Work> pending;
  // A later message's first collective is a whole segment, whatever the
  // message's length: receivers post it before they know that length.
  auto post = [&]() {
    const int j = ahead ? int(posted++ % 2) : 1;
    if (!host[j].defined()) host[j] = host_block(segment);
    pending_j = j;
    pending = post_one(host[j].narrow(0, 0, int64_t(segment)));
  };

  StreamFollower f{dec, max_bytes, b, route};
  at::Tensor buf = frame;
  bool first = true;
  for (;;) {
    const uint8_t* msg = buf.data_ptr<uint8_t>();
    uint64_t avail = uint64_t(buf.numel());
    uint64_t msg_len = 0, device_len = 0;
    uint16_t flags = 0;
    if (!dec.segment(msg, avail, &msg_len, &device_len, &flags)) corrupt();
    if (!first && avail < msg_len) {
      // Longer than its first collective (its one item is): the rest in
      // the source's chunks, kept whole if it is to be decoded, else
      // dropped piece by piece (the segment header is all that is left).
      if (f.following() && f.fits(msg_len, device_len)) {
        at::Tensor whole = host_block(msg_len);
        std::memcpy(whole.data_ptr<uint8_t>(), msg, avail);
        std::vector<c10::intrusive_ptr<c10d::Work>> works;
        // The clock is read after every post: posting many tiny chunks takes time too.
        for (uint64_t off = avail; off < msg_len; off += chunk, in_time())
          works.push_back(post_one(whole.narrow(0, int64_t(off), int64_t(std::min<uint64_t>(chunk, msg_len - off)))));
        for (auto& w : works) wait(w);
        buf = whole;
        msg = buf.data_ptr<uint8_t>();
        avail = msg_len;
      } else {
        at::Tensor scratch =
            at::empty({int64_t(std::min<uint64_t>(chunk, msg_len - avail))}, at::TensorOptions(at::kByte));
        for (uint64_t off = avail; off < msg_len; off += chunk)
          wait(post_one(scratch.narrow(0, 0, int64_t(std::min<uint64_t>(chunk, msg_len - off)))));
      }
    }
    at::Tensor device;
    if (flags & SEG_CUDA) device = THPVariable_Unpack(b.attr("_stream_device")(device_len, route, deadline).ptr());
    const bool last = flags & SEG_LAST;
    if (!last && ahead) post();  // the next message moves while this one is decoded
    f.take(msg, avail, msg_len, device_len, flags, device.defined() ? &device : nullptr);
    if (last) break;
    if (!ahead) post();
    wait(pending);
    pending.reset();
    buf = host[pending_j].narrow(0, 0, int64_t(segment));
    first = false;
  }
  return f.outcome();
}

void bind_collective(py::module_& m) {
  g_collective_error = PyErr_NewExceptionWithDoc(
      "fastbcast.CollectiveError",
      "A broadcast collective made from C++ failed: a peer died or closed its end, or the wait passed its "
      "timeout. A RuntimeError; the message starts with the c10d error's class.",
      PyExc_RuntimeError, nullptr);
  if (!g_collective_error) throw py::error_already_set();
  m.attr("CollectiveError") = py::reinterpret_steal<py::object>(g_collective_error);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CollectiveFailed& e) {
      PyErr_SetString(g_collective_error, (e.type + ": " + e.what()).c_str());
    }
  });

  using G = GroupCollective;
  py::class_<G, std::shared_ptr<G>>(m, "CollectiveChannel",
                                    "One source's frames over a CPU process group's broadcast collective, made "
                                    "from C++ (csrc/group_collective.h)")
      .def(py::init([](py::handle pg, uint32_t first_chunk, uint32_t chunk) {
             if (first_chunk < kHeaderBytes) throw py::value_error("first_chunk is shorter than a frame header");
             return std::make_shared<G>(py::cast<c10::intrusive_ptr<c10d::ProcessGroup>>(pg), first_chunk, chunk);
           }),
           py::arg("group"), py::arg("first_chunk"), py::arg("chunk"),
           "group: a torch.distributed ProcessGroup whose broadcast moves CPU tensors. RuntimeError if it is not "
           "a c10d ProcessGroup.")
      .def_readwrite("root", &G::root, "The source of the next frames, as a group rank.")
      .def_property(
          "buffer", [](G& g) { return steal(THPVariable_Wrap(g.buffer())); },
          [](G& g, py::handle b) {
            g.set_buffer(b.is_none() ? at::Tensor() : host_bytes(b, "buffer"));
            if (b.is_none() || g.buffer().numel() >= g.first_chunk()) return;
            g.set_buffer(at::Tensor());
            throw py::value_error("buffer is shorter than first_chunk");
          },
          "Where frames are received (at least first_chunk bytes; None: a pool block at the next receive).")
      .def(
          "send_object",
          [](G& g, py::handle obj, uint64_t stream_bytes, uint32_t first_chunk, uint32_t chunk,
                    uint16_t version, uint64_t seq, bool compat, bool allow_pickle, bool collect_cuda,
                    const py::object& trusted, uint64_t max_bytes, std::optional<double> timeout_s, py::handle b,
                    py::handle route, py::handle deadline) -> py::object {
            // ShmChannel.send_object's contract, with "one slot" read as "the
            // first collective": a stream within max_bytes is sent whole
            // (with `b`); anything else comes back unsent, in a block at
            // least first_chunk long (the general path moves that much).
            if (first_chunk != g.first_chunk() || chunk != g.chunk())
              throw py::value_error("first_chunk/chunk differ from the channel's");
            const CallClock clock(timeout_s);
            g.sending = g.streaming = false;
            if (streamable(obj.ptr(), stream_bytes)) {
              auto s = std::make_unique<PyStreamEncoder>(
                  PyStreamEncoder{py::reinterpret_borrow<py::object>(obj), trusted, nullptr});
              s->enc = std::make_unique<StreamEncoder>(obj.ptr(), stream_bytes,
                                                       encode_options(compat, allow_pickle, s->trusted), collect_cuda);
              bool streaming = false;
              StreamMessage msg = stream_first(*s, first_chunk, chunk, version, seq,
                                               std::max<size_t>(first_chunk, g.size_hint), &streaming);
              // A stream within max_bytes is sent whole here; anything else
              // (a plain frame too: it may need more than the first
              // collective) comes back unsent.
              if (streaming && msg.len - kHeaderBytes + msg.device_len <= max_bytes && !b.is_none()) {
                CollectivePipe pipe{g, *s->enc, clock};
                send_stream(pipe, *s->enc, std::move(msg), max_bytes, b, route, deadline);
                return py::none();
              }
              return first_tuple(msg, std::move(s), streaming);
            }
            std::vector<at::Tensor> cuda;
            const bool small = g.size_hint <= first_chunk;
            Encoded e = encode_frame_block(obj.ptr(), first_chunk, chunk, version, seq, compat, allow_pickle,
                                           small ? 0 : g.size_hint, trusted, collect_cuda ? &cuda : nullptr,
                                           small ? &g.scratch() : nullptr, first_chunk);
            g.size_hint = e.len;
            if (e.len > first_chunk || !cuda.empty() || e.len - kHeaderBytes > max_bytes)
              return unsent_frame(e, cuda, first_chunk);
            at::Tensor frame = e.block.defined() ? e.block.narrow(0, 0, first_chunk) : g.scratch_tensor();
            const WaitPolicy q = clock.left();  // the encode counts against the timeout
            g.sending = true;
            if (clock.passed(q)) throw CollectiveFailed("RuntimeError", "timed out: the encode used the call's timeout");
            {
              py::gil_scoped_release nogil;
              g.broadcast(frame, g.root, q.timeout_s);
            }
            g.sending = false;
            return py::none();
          },
          py::arg("obj"), py::arg("stream_bytes"), py::arg("first_chunk"), py::arg("chunk"), py::arg("version"),
          py::arg("seq"), py::arg("compat"), py::arg("allow_pickle"), py::arg("collect_cuda"), py::arg("trusted"),
          py::arg("max_bytes"), py::arg("timeout_s") = py::none(), py::arg("broadcaster") = py::none(),
          py::arg("route") = py::none(), py::arg("deadline") = py::none(),
          "Encodes obj as a frame and, if it fits the first collective, has no CUDA tensors, is within max_bytes "
          "and is not a stream, broadcasts it and returns None. A stream whose message 0 is within max_bytes is "
          "sent whole (with `broadcaster`: send_stream over a CollectivePipe) and None returned. Otherwise returns "
          "encode_frame_or_stream's (block, frame_bytes, cuda_tensors, device_len, stream), unsent. Encode errors "
          "raise before anything is sent (mid-stream: after the error segment, broadcaster._told_receivers set); "
          "`sending` tells a failure of the collective (CollectiveError) apart, `streaming` one mid-stream.")
      .def_property_readonly("sending", [](G& g) { return g.sending; },
                             "True if send_object's collective was made and failed: a failure then is the "
                             "transport's, not the encoder's.")
      .def_property_readonly("streaming", [](G& g) { return g.streaming; },
                             "True if that failure came while send_object sent a stream.")
      .def(
          "recv_object",
          [](G& g, uint16_t version, uint64_t seq, uint64_t max_bytes, bool allow_pickle,
                    const py::object& trusted, std::optional<double> timeout_s, py::handle, py::handle,
                    py::handle) -> py::object {
            // A plain frame of this version and call number within the first
            // collective is decoded from it. Anything else stays pending
            // (SHM_NOT_INLINE is returned): take() gives its first
            // collective to the general path, which says what is wrong.
            at::Tensor buf = g.buffer().narrow(0, 0, g.first_chunk());
            const double t = CallClock(timeout_s).p.timeout_s;
            {
              py::gil_scoped_release nogil;
              g.broadcast(buf, g.root, t);
            }
            const uint8_t* data = buf.data_ptr<uint8_t>();
            FrameHeader h;
            std::string err;
            if (!read_header(data, g.first_chunk(), version, &h, &err) || h.version != version || h.flags != 0 ||
                h.seq != seq || h.frame_len > g.first_chunk() || h.first_chunk != g.first_chunk() || h.chunk != g.chunk() ||
                h.payload_len > max_bytes) {
              g.pending = true;
              return py::reinterpret_borrow<py::object>(g_not_inline);
            }
            DecodeOptions opts = decode_options(allow_pickle, trusted);
            return steal(decode_object(data + kHeaderBytes, h.payload_len, opts, kHeaderBytes));
          },
          py::arg("version"), py::arg("seq"), py::arg("max_bytes"), py::arg("allow_pickle"), py::arg("trusted"),
          py::arg("timeout_s") = py::none(), py::arg("broadcaster") = py::none(), py::arg("route") = py::none(),
          py::arg("deadline") = py::none(),
          "Receives the first collective of the next frame and decodes it if it is a plain frame of this version "
          "and call number that fits there; otherwise returns SHM_NOT_INLINE with the bytes pending (take()).")
      .def(
          "recv_stream",
          [](G& g, PyStreamDecoder& s, py::handle frame, uint64_t max_bytes, uint32_t chunk,
             std::optional<double> timeout_s, py::handle broadcaster, py::handle route, py::handle deadline) {
            return recv_stream_collective(g, s, host_bytes(frame, "frame"), max_bytes, chunk ? chunk : g.chunk(),
                                          CallClock(timeout_s), broadcaster, route, deadline);
          },
          py::arg("decoder"), py::arg("frame"), py::arg("max_bytes"), py::arg("chunk"), py::arg("timeout_s"),
          py::arg("broadcaster"), py::arg("route"), py::arg("deadline"),
          "Receiver: the object of a stream whose message 0 is `frame` and `decoder` was opened on "
          "(recv_stream_collective: every later message received and decoded here, with the source's `chunk`, "
          "0: this channel's). Raises the broadcaster's _stream_failure(...) for an error segment, a stream over "
          "max_bytes or a corrupt segment header, a segment's DecodeError, each once the stream is over; "
          "CollectiveError at once if a collective fails or the timeout passes.")
      .def(
          "take",
          [](G& g) -> py::object {
            if (!g.pending) return py::none();
            g.pending = false;
            return steal(THPVariable_Wrap(g.buffer()));
          },
          "The buffer whose first first_chunk bytes hold the pending first collective, or None if none is "
          "pending.")
      .def_property_readonly("collectives", &G::collectives, "Collectives this channel has made.");
}

}  // namespace fastbcast
