// MessagePack codes, fastbcast's ext type codes and the broadcast frame header.
// FORMAT.md is the reference for every constant here; keep the two in step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace fastbcast {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "fastbcast assumes a little-endian host");

// MessagePack type bytes (https://github.com/msgpack/msgpack/blob/master/spec.md).
enum Code : uint8_t {
  POSFIXINT_MAX = 0x7f,
  FIXMAP = 0x80,      // 0x80..0x8f
  FIXARRAY = 0x90,    // 0x90..0x9f
  FIXSTR = 0xa0,      // 0xa0..0xbf
  NIL = 0xc0,
  NEVER_USED = 0xc1,
  FALSE_ = 0xc2,
  TRUE_ = 0xc3,
  BIN8 = 0xc4,
  BIN16 = 0xc5,
  BIN32 = 0xc6,
  EXT8 = 0xc7,
  EXT16 = 0xc8,
  EXT32 = 0xc9,
  FLOAT32 = 0xca,
  FLOAT64 = 0xcb,
  UINT8 = 0xcc,
  UINT16 = 0xcd,
  UINT32 = 0xce,
  UINT64 = 0xcf,
  INT8 = 0xd0,
  INT16 = 0xd1,
  INT32 = 0xd2,
  INT64 = 0xd3,
  FIXEXT1 = 0xd4,
  FIXEXT2 = 0xd5,
  FIXEXT4 = 0xd6,
  FIXEXT8 = 0xd7,
  FIXEXT16 = 0xd8,
  STR8 = 0xd9,
  STR16 = 0xda,
  STR32 = 0xdb,
  ARRAY16 = 0xdc,
  ARRAY32 = 0xdd,
  MAP16 = 0xde,
  MAP32 = 0xdf,
  NEGFIXINT = 0xe0,   // 0xe0..0xff
};

// fastbcast's ext type codes. Never reuse a retired code.
enum Ext : int8_t {
  EXT_TUPLE = 1,
  EXT_SET = 2,
  EXT_FROZENSET = 3,
  EXT_BIGINT = 4,
  EXT_COMPLEX = 5,
  EXT_INT_BLOCK = 6,
  EXT_TENSOR = 7,
  EXT_CUDA_REF = 8,
  EXT_NDARRAY = 9,
  // 10 (ENUM), 11 (OBJECT) and 12 (PYARRAY) are format 1 layouts, retired.
  EXT_BYTEARRAY = 13,
  EXT_MEMORYVIEW = 14,
  EXT_PICKLE = 15,
  EXT_PYARRAY = 16,      // u8 typecode, u8 width code (IntWidth or kRawWidth), items
  EXT_OBJECT_DEF = 17,   // a class table entry, then the first instance of that class
  EXT_OBJECT = 18,       // class table index, then the instance
  EXT_REF = 19,          // memo index of an object that already travelled in this message
  EXT_SURROGATE_STR = 20,  // a str holding lone surrogates, UTF-8 with surrogatepass
  EXT_NPSCALAR = 21,     // u8 n, n bytes of dtype.str, the raw value
  EXT_ABSENT = 22,       // empty: an instance lacks this layout attribute
};

// How an instance is rebuilt: the kind of a class table entry (FORMAT.md).
enum WireKind : uint8_t {
  WK_STRUCT = 1,    // msgspec Struct: its fields in table order
  WK_PYDANTIC = 2,  // pydantic v2 model: __dict__, extra, fields_set, private
  WK_OBJECT = 3,    // default pickle protocol: __dict__ then __slots__
  WK_REDUCE = 4,    // __reduce_ex__ naming the class itself: args, state, list and dict items
  WK_CLASS = 5,     // the class object itself (a defaultdict's factory)
  WK_CALL = 6,      // __reduce_ex__ naming a trusted callable: the entry names the callable; args, state, items
  WK_TENSOR = 7,    // torch.Tensor subclass: its values, requires_grad, __dict__
};
// EXT_PYARRAY width code for items copied as they are (float, unicode arrays).
inline constexpr uint8_t kRawWidth = 0xff;
// bytes at least this long take a memo slot (shared references travel once).
inline constexpr size_t kMemoBytesMin = 64;
// Most attributes a class table layout lists.
inline constexpr size_t kMaxLayout = 255;

// Element widths of an EXT_INT_BLOCK.
enum IntWidth : uint8_t { W_U8 = 0, W_U16 = 1, W_U32 = 2, W_I32 = 3, W_I64 = 4, W_U64 = 5 };
inline constexpr size_t kIntWidthBytes[] = {1, 2, 4, 4, 8, 8};

// Lists of at least this many ints are written as an EXT_INT_BLOCK.
inline constexpr size_t kIntBlockMin = 8;
// Containers and instances nested deeper than this are refused on encode
// (or pickled, with allow_pickle) and decode; before that, a thread whose C
// stack runs low stops with an error instead (stack_guard.h).
inline constexpr int kMaxDepth = 1024;

// Unaligned little-endian / big-endian loads and stores.
template <typename T>
inline T load_le(const uint8_t* p) { T v; std::memcpy(&v, p, sizeof(T)); return v; }
template <typename T>
inline void store_le(uint8_t* p, T v) { std::memcpy(p, &v, sizeof(T)); }
inline uint16_t load_be16(const uint8_t* p) { return __builtin_bswap16(load_le<uint16_t>(p)); }
inline uint32_t load_be32(const uint8_t* p) { return __builtin_bswap32(load_le<uint32_t>(p)); }
inline uint64_t load_be64(const uint8_t* p) { return __builtin_bswap64(load_le<uint64_t>(p)); }
inline void store_be16(uint8_t* p, uint16_t v) { store_le<uint16_t>(p, __builtin_bswap16(v)); }
inline void store_be32(uint8_t* p, uint32_t v) { store_le<uint32_t>(p, __builtin_bswap32(v)); }
inline void store_be64(uint8_t* p, uint64_t v) { store_le<uint64_t>(p, __builtin_bswap64(v)); }

// The broadcast frame header (FORMAT.md section 3). Its first 32 bytes (the
// fixed part) keep their layout in every format version, so a receiver of
// another version can still find the frame's end and drain it: the stored
// length counts every byte after the fixed part. Version 2 follows the fixed
// part with the group's sequence number.
inline constexpr uint8_t kMagic[4] = {'F', 'B', 'C', 0x01};
inline constexpr size_t kFixedHeaderBytes = 32;
inline constexpr size_t kHeaderBytes = 40;  // where the value starts
enum HeaderFlag : uint16_t { FLAG_ERROR = 1, FLAG_CUDA = 2, FLAG_STREAM = 4 };

// A streamed frame (FORMAT.md section 3.1, version 3): message 0 is the
// header, the stream prologue and segment 0; every later message is one
// segment. A segment header starts each segment.
inline constexpr size_t kStreamPrologueBytes = 16;  // u8 kind, 3 zero, u32 segment_bytes, u64 items
inline constexpr size_t kSegmentHeaderBytes = 32;   // u64 length, u64 device_len, u32 index, u32 items, u16 flags, 6 zero
inline constexpr size_t kStreamBodyOffset = kHeaderBytes + kStreamPrologueBytes + kSegmentHeaderBytes;
enum StreamKind : uint8_t { STREAM_LIST = 0, STREAM_TUPLE = 1, STREAM_DICT = 2 };
enum SegmentFlag : uint16_t { SEG_ERROR = 1, SEG_LAST = 2, SEG_CUDA = 4 };
// Bounds on a stream's segment_bytes; receivers allocate that much per message.
inline constexpr uint64_t kMinSegmentBytes = 128;
inline constexpr uint64_t kMaxSegmentBytes = uint64_t(1) << 30;

struct FrameHeader {
  uint16_t version = 0;
  uint16_t flags = 0;
  uint64_t payload_len = 0;  // bytes of the value (or of the error message) after the whole header
  uint32_t first_chunk = 0;
  uint32_t chunk = 0;
  uint64_t device_len = 0;
  uint64_t seq = 0;          // the group's call number (version 2)
  uint64_t frame_len = 0;    // read_header: header + value, as the fixed part states it (any version)
};

}  // namespace fastbcast
