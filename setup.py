"""Builds dlcore._C (C++ CPU kernels) and, where torch has CUDA and nvcc exists, dlcore._C_cuda.

Install with the torch that is already present (no second torch, no CUDA wheels on a CPU box):
    pip install --no-build-isolation -e .
Environment: DLCORE_CUDA_ARCHS (default "80;90"), MAX_JOBS (ninja parallelism), DLCORE_NO_EXT=1
(skip every extension: dlcore then runs on its eager and triton backends only).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _torch_arch_list() -> str:
    """DLCORE_CUDA_ARCHS ("80;90") in TORCH_CUDA_ARCH_LIST's spelling ("8.0;9.0a")."""
    archs = []
    for arch in os.environ.get("DLCORE_CUDA_ARCHS", "80;90").replace(",", ";").split(";"):
        arch = arch.strip().replace(".", "")
        if arch:
            # sm_90a unlocks wgmma/TMA for hand-written Hopper code.
            archs.append(f"{arch[:-1]}.{arch[-1]}" + ("a" if arch == "90" else ""))
    return ";".join(archs)


def _extensions():
    if os.environ.get("DLCORE_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # Portable baseline (any x86-64); hot loops carry target_clones for AVX2/AVX-512 at run time.
    # GCC's generic tuning keeps AVX-512 clones at 256-bit vectors; ask for full width.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
           "-mprefer-vector-width=512"]  # fmt: skip
    include_dirs = [os.path.join(ROOT, "csrc")]
    exts = [
        CppExtension(
            "dlcore._C",
            _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _torch_arch_list()
        exts.append(
            CUDAExtension(
                "dlcore._C_cuda",
                _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp"),
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
                },
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
