"""Build script: the native extension gemma4rt._C is compiled from csrc/ when the importable torch
has CUDA (nvcc found) or ROCm (hipcc found); otherwise the package installs as pure Python and every
op runs its PyTorch reference (gemma4rt/ops/reference.py).

Environment knobs:
  GEMMA4RT_BUILD_EXT=0|1   force the extension off / on (on fails loudly if it cannot be built)
  TORCH_CUDA_ARCH_LIST     target GPUs, e.g. "9.0a" (default: the GPUs of this machine, else 9.0a)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Sources a ROCm build leaves out (NVIDIA-only instructions); keep in step with CUDA_ONLY_OPS in
# gemma4rt/ops/_native.py and the USE_ROCM guards in csrc/torch_bindings.cpp.
CUDA_ONLY_SOURCES = ("csrc/attention/paged_attention.cu", "csrc/attention/decode8_attention.cu", "csrc/moe/moe_experts.cu",
                     "csrc/sampling/sample.cu")


def _ext_modules():
    flag = os.environ.get("GEMMA4RT_BUILD_EXT", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch absent in an isolated build: pure-Python install
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError(f"GEMMA4RT_BUILD_EXT=1 but torch cannot be imported: {exc}")
        return [], {}
    is_rocm = torch.version.hip is not None
    have_toolkit = (ce.ROCM_HOME is not None) if is_rocm else (ce.CUDA_HOME is not None and torch.version.cuda is not None)
    if not have_toolkit:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError("GEMMA4RT_BUILD_EXT=1 but no CUDA/ROCm toolkit matches the installed torch")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if is_rocm:
        # kernels written with NVIDIA-only instructions (mma.sync / ldmatrix / cp.async, thread-block
        # clusters) are left out; their ops run the PyTorch references (gemma4rt/ops/_native.py: CUDA_ONLY_OPS)
        cuda_only = {os.path.join("csrc", *p.split("/")) for p in CUDA_ONLY_SOURCES}
        sources = [s for s in sources if s not in cuda_only]
    if not sources:
        return [], {}
    if not is_rocm and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(
                f"{a}.{b}a" if (a, b) == (9, 0) else f"{a}.{b}" for a, b in sorted(caps))
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    # C++20, as torch's own extension builder and headers (torch >= 2.10) use
    nvcc = ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    cxx = ["-O3", "-std=c++20"]
    if is_rocm:
        nvcc = ["-O3", "-std=c++20", "-DUSE_ROCM=1"]
        cxx = cxx + ["-DUSE_ROCM=1"]
    ext = ce.CUDAExtension(
        name="gemma4rt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
