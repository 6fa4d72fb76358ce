// Which Python classes the codec may write as EXT_ENUM / EXT_OBJECT, and which
// it may rebuild on decode.
//
// Encoding looks a class up by its type object; the answer (kind, wire name,
// field names) is cached per class for the life of the process, because
// computing it calls dataclasses.fields() / reads model_fields. Decoding
// rebuilds only classes that were registered with fastbcast.register() or
// whose module starts with a trusted prefix, and finds those in sys.modules:
// it never imports.
#pragma once

#include <Python.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace fastbcast {

enum class Kind : uint8_t { UNSUPPORTED = 0, ENUM, DATACLASS, PYDANTIC, STRUCT };

struct TypeInfo {
  Kind kind = Kind::UNSUPPORTED;
  PyObject* cls = nullptr;     // strong reference
  PyObject* name = nullptr;    // "module:QualName" (str), strong reference
  PyObject* fields = nullptr;  // tuple of field names (str), strong reference; NULL for enums
};

class TypeRegistry {
 public:
  static TypeRegistry& instance();

  // The cached description of `type` for encoding. Returns nullptr with a
  // Python error set if inspecting the class raised.
  const TypeInfo* for_encode(PyTypeObject* type);

  // The class to rebuild for a wire name, or nullptr (no error set) if the
  // name is neither registered nor under a trusted prefix (the global ones or
  // `extra_trusted`, a tuple of str or NULL). Returns nullptr with an error
  // set only if a Python call failed.
  const TypeInfo* for_decode(PyObject* name, PyObject* extra_trusted);

  // fastbcast.register(cls): trust this class for decoding. Raises TypeError
  // for classes the codec cannot represent.
  bool register_class(PyObject* cls);
  void add_trusted_prefix(const std::string& prefix);
  PyObject* registered_names();  // new reference: list of str

 private:
  TypeRegistry() = default;
  bool classify(PyObject* cls, TypeInfo* out);
  bool trusted(const char* name, Py_ssize_t n, PyObject* extra_trusted);

  std::unordered_map<PyTypeObject*, TypeInfo> by_type_;
  std::unordered_map<std::string, TypeInfo> by_name_;
  std::vector<std::string> trusted_;
};

}  // namespace fastbcast
