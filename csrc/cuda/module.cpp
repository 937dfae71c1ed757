// `import dlcore._C_cuda` loads the CUDA kernels; their TORCH_LIBRARY_IMPL(dlcore, CUDA, m)
// registrations (in csrc/cuda/<family>_binding.cpp) run on load. No Python functions.
#include <Python.h>

static struct PyModuleDef dlcore_c_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1,
                                                  nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&dlcore_c_cuda_module); }
