"""Builds codetr and its compiled operators, codetr._C.

Environment:
  CODETR_BUILD_EXT=0       pure-Python install (every op uses its PyTorch reference)
  CODETR_CUDA=auto|0|1     auto: CUDA sources when a CUDA toolkit, a CUDA-enabled torch and
                           a GPU are present; 1: build them without a GPU (fail if
                           impossible); 0: CPU sources only
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "9.0" (torch's own variable)
  MAX_JOBS                 parallel compile jobs (defaults to the number of cores)

Install with `pip install --no-build-isolation .` (or -e): the extension must be compiled
against the torch that will import it, and build isolation would make pip download and
build against a second, multi-GB torch.
"""
import glob
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _extensions():
    if os.environ.get("CODETR_BUILD_EXT", "1") == "0":
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME at import; the `nvcc` on our machines'
    # PATH is a wrapper script from which torch would guess the wrong root.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    import torch
    from torch.utils import cpp_extension

    mode = os.environ.get("CODETR_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CODETR_CUDA must be auto, 0 or 1, got {mode!r}")
    toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not toolkit:
        raise SystemExit(
            "CODETR_CUDA=1 but CUDA sources cannot be built: "
            f"CUDA_HOME={cpp_extension.CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}"
        )
    with_cuda = mode == "1" or (mode == "auto" and toolkit and torch.cuda.is_available())

    os.chdir(ROOT)  # setuptools wants source paths relative to setup.py
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # -fopenmp: at::parallel_for is an inline OpenMP region, serial without it.
    cxx = ["-O3", "-fopenmp", "-fopenmp-simd", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension("codetr._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("codetr._C", sources, **kwargs)
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
