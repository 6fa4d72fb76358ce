// Which Python classes the codec may write as class instances, how their
// pickle state is read and restored, and which it may rebuild on decode.
//
// Encoding looks a class up by its type object; the answer (kind, wire name,
// field offsets) is cached per class. The cache holds classes through weak
// references, so a class that is dropped (a test's local dataclass, a class
// the codec refused) leaves the cache with it. Decoding rebuilds only
// classes that were registered with fastbcast.register(), that sit under a
// trusted prefix, or that are on the short list of standard-library classes
// (datetime, uuid, decimal, collections; torch.nn.Parameter, torch.Tensor) the codec
// rebuilds without asking, and calls only the __reduce__ callables that are
// registered classes or under a trusted prefix; it finds both among loaded
// modules and never imports a module named by the bytes.
#pragma once

#include <Python.h>
#include <structmember.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace fastbcast {

// How the class's own pickle protocol says to read and rebuild an instance.
enum class Kind : uint8_t {
  UNSUPPORTED = 0,  // not a class instance the codec rebuilds (functions, modules, ...)
  STRUCT,           // msgspec Struct: fields in slots
  PYDANTIC,         // pydantic v2 model: __dict__ + three private slots
  OBJECT,           // default protocol: __dict__ and __slots__, object.__new__
  REDUCE,           // its own __reduce__/__getstate__/__setstate__: asked per instance
  NPSCALAR,         // numpy scalar (np.float64, np.int64, ...)
  NDARRAY,
  PYARRAY,          // array.array
  TENSOR,           // torch.Tensor subclass (nn.Parameter, or one keeping Tensor's pickle protocol)
};

// A class table entry's attribute names as a sender wrote them, resolved
// against this process's class. Kept per class, so a steady stream of
// messages decodes each layout once instead of once per message.
struct Layout {
  std::string key;                    // wire kind + the layout's raw bytes
  std::vector<PyObject*> names;       // interned, strong references
  std::vector<PyMemberDef*> members;  // STRUCT: the slot of each name
  Layout() = default;
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
  ~Layout() {
    for (PyObject* n : names) Py_DECREF(n);
  }
};

struct TypeInfo {
  Kind kind = Kind::UNSUPPORTED;
  PyObject* cls = nullptr;      // borrowed: the cache entry dies with the class
  PyObject* name = nullptr;     // "module:QualName" (str), strong reference
  PyObject* fields = nullptr;   // STRUCT: tuple of field names; OBJECT: slot names (tuple); else NULL
  std::vector<PyMemberDef*> members;  // STRUCT: one per field
  bool builtin_trusted = false;  // on the standard-library list
  bool user_class = false;       // a class register() accepts (a heap type the codec can rebuild)
  // Encoder bookkeeping: the class table slot it holds in the message being
  // encoded (valid while msg_epoch matches the encoder's).
  uint64_t msg_epoch = 0;
  uint32_t msg_index = 0;
  uint32_t trust_gen = 0;        // registry generation trusted_now was computed for (0: never)
  bool trusted_now = false;
  std::shared_ptr<const Layout> last_layout;  // decoder: the layout last received for this class
};

// pydantic BaseModel's private slots, in the order the wire carries them.
struct PydanticSlots {
  PyMemberDef* extra = nullptr;
  PyMemberDef* fields_set = nullptr;
  PyMemberDef* priv = nullptr;
};

class TypeRegistry {
 public:
  static TypeRegistry& instance();

  // The cached description of `type` for encoding. Returns nullptr with a
  // Python error set if inspecting the class raised.
  TypeInfo* for_encode(PyTypeObject* type);

  // Whether instances of `info`'s class may be written natively: registered,
  // on the standard-library list, or under a trusted prefix (the global ones
  // or `extra_trusted`, a tuple of str or NULL).
  bool may_write(TypeInfo* info, PyObject* extra_trusted);

  // The class for a wire name, or nullptr (no error set) if the name is not
  // registered, trusted or on the standard-library list, or names no loaded
  // class. Returns nullptr with an error set only if a Python call failed.
  TypeInfo* for_decode(PyObject* name, PyObject* extra_trusted);
  // The same from the name's UTF-8, remembering the answer for the next message.
  TypeInfo* for_decode(const char* name, size_t n, PyObject* extra_trusted);

  // A rebuild callable named by a __reduce__ (not the class itself): its wire
  // name ("module:QualName", new reference) if receivers may call it, that
  // is if it is a registered class or sits under a trusted prefix and the
  // name finds it again among loaded modules; else nullptr (no error set,
  // unless a Python call failed). `findable`: whether the name finds it at
  // all (if not, trusting its module would not help either).
  PyObject* callable_name(PyObject* fn, PyObject* extra_trusted, bool* findable);
  // The callable for such a wire name (new reference), or nullptr (no error
  // set) if it is not registered / under a trusted prefix, or names nothing
  // callable in a loaded module.
  PyObject* callable_for_decode(const char* name, size_t n, PyObject* extra_trusted);

  // fastbcast.register(cls): trust this class for decoding. Raises TypeError
  // for classes the codec cannot rebuild.
  bool register_class(PyObject* cls);
  void add_trusted_prefix(const std::string& prefix);
  PyObject* registered_names();  // new reference: list of str

  const PydanticSlots& pydantic_slots() const { return pyd_; }
  // Drops the cache entry of a class that is being destroyed (weakref callback).
  void forget(PyTypeObject* type);

 private:
  TypeRegistry() = default;
  bool classify(PyObject* cls, TypeInfo* out);
  bool trusted(const char* name, Py_ssize_t n, PyObject* extra_trusted);
  // The object a wire name designates among loaded modules (new reference),
  // provided its own __module__ and __qualname__ spell that name; never imports.
  PyObject* resolve_loaded(const char* name, size_t n);

  std::unordered_map<PyTypeObject*, TypeInfo> by_type_;
  std::unordered_map<PyTypeObject*, PyObject*> weakrefs_;  // keep the weakrefs (and so their callbacks) alive
  std::unordered_map<std::string, PyObject*> by_name_;     // registered classes, strong references
  std::vector<std::string> trusted_;
  std::unordered_map<std::string, PyTypeObject*> decoded_names_;  // wire name -> class it resolved to
  uint32_t gen_ = 1;  // bumped by register/trust: cached trust answers are recomputed
  PydanticSlots pyd_;
};

// The str's UTF-8, or `fallback` (with any error cleared) if it has none.
const char* utf8_or(PyObject* s, const char* fallback);

// Clears the pending exception unless it is not an Exception (KeyboardInterrupt,
// SystemExit): those must reach the caller unchanged. Returns true if cleared.
bool clear_unless_fatal();
// True if the pending exception must propagate unchanged (see clear_unless_fatal).
bool pending_is_fatal();

}  // namespace fastbcast
