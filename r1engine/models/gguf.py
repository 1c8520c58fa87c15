"""`.gguf` files in: dequantized through transformers (with the `gguf` package) and written once as a Hugging Face
safetensors directory, which is what the engine, transformers and vLLM then load.

`model.path` may name a `.gguf` file: it is converted on first use into a cache directory (`$R1ENGINE_CACHE`, else
`~/.cache/r1engine`, under `gguf/<name>-<hash of path, size, mtime>`) and read from there afterwards.
`r1engine convert FILE.gguf OUT_DIR` writes the same directory where the user wants it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("R1ENGINE_CACHE") or Path.home() / ".cache" / "r1engine")


def _require_gguf(key: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"{key}: reading a .gguf file needs the `gguf` package: pip install 'r1engine[gguf]' (or pip install gguf)"
        ) from exc


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, key: str = "model.path") -> Path:
    """Dequantize `path` to float32 and write a Hugging Face directory to `out_dir` (config.json without the
    quantization entry, generation_config.json, model.safetensors, the tokenizer's files); returns `out_dir`.
    Written to a temporary sibling and renamed, so an interrupted conversion leaves nothing half-written."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"{key}: {str(src)!r} does not exist")
    _require_gguf(key)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        config = model.config
        if hasattr(config, "quantization_config"):  # the weights written below are dequantized
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # one tensor, stored once (safetensors refuses shared storage)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": src.name})
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # mkdtemp's private modes would hide the model from other users of the machine
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_gguf_dir(path: str | os.PathLike, key: str = "model.path") -> Path:
    """The converted directory of a `.gguf` file, converting it on first use (see the module docstring)."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{key}: {str(src)!r} does not exist")
    stat = src.stat()
    digest = hashlib.sha256(f"{src}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{src.stem}-{digest}"
    if not (out / "config.json").is_file():
        convert_gguf(src, out, key)
    return out
