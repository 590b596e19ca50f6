// The Python face of codetr._C: an empty module. Importing it loads the shared library,
// whose static initializers register the operators with torch.ops.codetr. Only Python.h
// is included, so this file costs nothing to compile; the CMake build leaves it out and
// its library is loaded with torch.ops.load_library instead.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
