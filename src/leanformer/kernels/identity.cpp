// The fused decode step's staleness check (models/fused.py DecodePlan.get): whether every (container
// dict, key, object) entry still holds that very object, i.e. no module or tensor the C++ stack captured
// was swapped since it was built.
//
// Why in C++: the check runs before every decode step on the checked paths (the server, streaming,
// speculation) over ~750 entries for a 30-layer model, and every token streams ~100 MB of weights through
// the caches, so each entry's dict misses. As a Python generator it took ~180-260 us per step on a Zen 5
// VM; this loop, the same dict lookups without the interpreter between them, ~120 us (and ~1 us warm).
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace leanformer {

class ObjectIdentity {
 public:
  // entries: a list of (dict, key, object) tuples; references to all three are held
  explicit ObjectIdentity(const pybind11::list& entries) {
    entries_.reserve(entries.size());
    for (const pybind11::handle e : entries) {
      const auto t = pybind11::reinterpret_borrow<pybind11::tuple>(e);
      TORCH_CHECK(t.size() == 3 && PyDict_Check(t[0].ptr()), "identity entries are (dict, key, object) tuples");
      entries_.push_back({t[0], t[1], t[2]});
    }
  }

  // Whether each dict still maps its key to its object (the GIL is held: pybind11's default).
  bool holds() const {
    for (const Entry& e : entries_) {
      PyObject* now = PyDict_GetItemWithError(e.dict.ptr(), e.key.ptr());  // borrowed
      if (now != e.value.ptr()) {
        if (now == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
        return false;
      }
    }
    return true;
  }

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    pybind11::object dict, key, value;
  };
  std::vector<Entry> entries_;
};

void bind_identity(pybind11::module_& m) {
  pybind11::class_<ObjectIdentity>(m, "ObjectIdentity", pybind11::module_local(),
                                   "(dict, key, object) entries: holds() says whether each dict still maps "
                                   "its key to that very object")
      .def(pybind11::init<const pybind11::list&>(), pybind11::arg("entries"))
      .def("holds", &ObjectIdentity::holds)
      .def("__len__", &ObjectIdentity::size);
}

}  // namespace leanformer
