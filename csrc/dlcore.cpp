// The one schema file: every C++/CUDA kernel op of dlcore is declared here. Kernels register
// their implementations next to their code with TORCH_LIBRARY_IMPL(dlcore, CPU|CUDA, m).
// These are kernel-layer ops (contiguous tensors, plain scalars, outputs written in place);
// the user-facing ops with validation, fake impls and autograd live in dlcore/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dlcore, m) {
  // ---- sampler (csrc/cpu/sampler.cpp, csrc/cuda/sampler.cu) ----
}

// `import dlcore._C` loads this library and so runs the registrations above; it exposes no
// Python functions.
static struct PyModuleDef dlcore_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dlcore_c_module); }
