"""Build r1engine and its compiled core `r1engine._C`.

The extension is built from every C++ file under csrc/core (pure C++, also built standalone by
CMakeLists.txt) and csrc/torch (PyTorch operator registrations). CUDA sources under csrc/cuda are added
only when a CUDA toolkit and a CUDA-enabled torch are both present; otherwise they are left out and the
package still imports and uses its CPU and reference backends.

Environment switches:
  R1ENGINE_NO_CUDA=1    never build the CUDA sources
  R1ENGINE_MARCH=...    -march value for the CPU code (default: native; "none" to omit)
  R1ENGINE_CUDA_ARCH=.. CUDA architectures (default: 9.0, i.e. sm_90 for H100/H200)
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda() -> bool:
    if os.environ.get("R1ENGINE_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and bool(_sources("csrc/cuda/*.cu"))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    march = os.environ.get("R1ENGINE_MARCH", "native")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DR1ENGINE_WITH_TORCH"]
    if march != "none":
        cxx.append(f"-march={march}")
    sources = _sources("csrc/core/*.cpp") + _sources("csrc/torch/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # libc10/libtorch are found through torch's own directory, so that `import r1engine._C` works before `import
    # torch`: the build's torch (an in-place build) and the one beside an installed package ($ORIGIN/../torch).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = ["-fopenmp", f"-Wl,-rpath,{torch_lib}", "-Wl,-rpath,$ORIGIN/../torch/lib"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("R1ENGINE_CUDA_ARCH", "9.0"))
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-DR1ENGINE_WITH_CUDA"]
        return [
            CUDAExtension(
                "r1engine._C",
                sources + _sources("csrc/cuda/*.cu"),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx + ["-DR1ENGINE_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "r1engine._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="r1engine",
        version="0.1.0",
        description="Custom-kernel performance engine for DeepSeek-R1-style GRPO training",
        python_requires=">=3.11",
        packages=find_packages(include=["r1engine", "r1engine.*"]) + ["r1engine.kernels"],
        package_dir={"r1engine.kernels": "kernels"},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        entry_points={"console_scripts": ["r1engine=r1engine.cli:main"]},
        install_requires=[line.strip() for line in open(os.path.join(ROOT, "requirements/base.txt"))
                          if line.strip() and not line.startswith("#")],
        # reading .gguf files (model.path=FILE.gguf, `r1engine convert`): pip install 'r1engine[gguf]'
        extras_require={"gguf": ["gguf>=0.17"]},
    )


if __name__ == "__main__":
    main()
