"""ROCm build of the native core. A ROCm build hipifies csrc/ (torch's extension builder) and leaves out the
kernels written with NVIDIA-only instructions (setup.py CUDA_ONLY_SOURCES), whose ops then run their PyTorch
references (gemma4rt/ops/_native.py CUDA_ONLY_OPS). Checked here:
  * the three places that name the left-out kernels agree (always runs);
  * with hipcc installed, every other kernel, hipified the way the extension builder does it, compiles for
    an AMD GPU (gfx90a); reported as not run when hipcc is absent."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")


def _setup_cuda_only_sources():
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r"CUDA_ONLY_SOURCES = \(([^)]*)\)", f.read())
    return sorted(re.findall(r'"([^"]+)"', m.group(1)))


def _rocm_guarded_ops():
    """Ops whose registration (m.def and m.impl) sits inside an #ifndef USE_ROCM block."""
    with open(os.path.join(CSRC, "torch_bindings.cpp")) as f:
        src = f.read()
    guarded = set()
    for block in re.findall(r"#ifndef USE_ROCM\n(.*?)#endif", src, re.S):
        guarded |= set(re.findall(r'm\.def\("(\w+)\(', block))
        guarded |= {"impl:" + n for n in re.findall(r'm\.impl\("(\w+)"', block)}
    return guarded


def test_left_out_kernels_agree():
    from gemma4rt.ops import _native
    sources = _setup_cuda_only_sources()
    assert sources and all(os.path.exists(os.path.join(ROOT, s)) for s in sources)
    guarded = _rocm_guarded_ops()
    ops = set(_native.CUDA_ONLY_OPS)
    assert {g for g in guarded if not g.startswith("impl:")} == ops
    assert {g[5:] for g in guarded if g.startswith("impl:")} == ops
    assert ops <= set(_native.OPS)


def test_every_bound_op_is_listed():
    """_native.OPS is what gets a fake kernel and what has_op() answers for: an op defined in torch_bindings.cpp
    but missing there would never be taken by a wrapper that asks has_op() first (so a fused path would silently
    stay off)."""
    import re
    from gemma4rt.ops import _native
    with open(os.path.join(CSRC, "torch_bindings.cpp")) as f:
        defined = set(re.findall(r'm\.def\("([a-z0-9_]+)\(', f.read()))
    assert defined and defined == set(_native.OPS)


HIPCC = shutil.which("hipcc")


@pytest.mark.skipif(HIPCC is None, reason="not run: hipcc not found (apt install hipcc)")
def test_portable_kernels_compile_for_rocm():
    from torch.utils.hipify import hipify_python
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(CSRC, os.path.join(d, "csrc"))
        cwd = os.getcwd()
        os.chdir(d)        # hipify as torch's extension builder does: in place, from the build directory
        try:
            srcs = sorted(glob.glob("csrc/**/*.cu", recursive=True))
            hipify_python.hipify(project_directory=d, output_directory=d,
                                 header_include_dirs=[os.path.join(d, "csrc")], includes=[os.path.join(d, "*")],
                                 extra_files=[os.path.abspath(s) for s in srcs], show_detailed=False,
                                 is_pytorch_extension=True, hipify_extra_files_only=True)
        finally:
            os.chdir(cwd)
        left_out = {os.path.splitext(s)[0] for s in _setup_cuda_only_sources()}
        hips = [h for h in sorted(glob.glob(os.path.join(d, "csrc", "**", "*.hip"), recursive=True))
                if os.path.splitext(os.path.relpath(h, d))[0] not in left_out]
        assert len(hips) == len(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)) - len(left_out)
        inc = ["-I", os.path.join(d, "csrc")]
        # an older HIP (Debian's 5.x) has no hip_bf16.h: a compile-only stand-in for the ROCm 6 types
        probe = subprocess.run([HIPCC, "--version"], capture_output=True, text=True)
        hip_root = os.path.dirname(os.path.dirname(os.path.realpath(HIPCC)))
        if not any(os.path.exists(os.path.join(p, "hip", "hip_bf16.h"))
                   for p in ("/usr/include", "/opt/rocm/include", os.path.join(hip_root, "include"))):
            shim = os.path.join(d, "shim", "hip")
            os.makedirs(shim)
            with open(os.path.join(shim, "hip_bf16.h"), "w") as f:
                f.write(BF16_STANDIN)
            inc += ["-I", os.path.join(d, "shim")]
        env = dict(os.environ, HIP_PLATFORM="amd")
        failures = []
        for h in hips:
            p = subprocess.run([HIPCC, "--offload-arch=gfx90a", "-std=c++20", "-O2", "-DUSE_ROCM=1",
                                "-D__HIP_PLATFORM_AMD__", *inc, "-c", h, "-o", os.devnull],
                               capture_output=True, text=True, env=env, timeout=600)
            if p.returncode != 0:
                failures.append(f"{os.path.relpath(h, d)}:\n{(p.stdout + p.stderr)[-3000:]}")
        assert not failures, f"{probe.stdout[:200]}\n" + "\n".join(failures)


BF16_STANDIN = """#pragma once
#include <hip/hip_runtime.h>
struct __hip_bfloat16 { unsigned short x; };
struct __hip_bfloat162 { __hip_bfloat16 x, y; };
__host__ __device__ inline float __bfloat162float(__hip_bfloat16 b) {
  unsigned int u = ((unsigned int)b.x) << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }
__host__ __device__ inline __hip_bfloat16 __float2bfloat16_rn(float f) {
  unsigned int u; __builtin_memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1);
  __hip_bfloat16 b; b.x = (unsigned short)(u >> 16); return b; }
"""

