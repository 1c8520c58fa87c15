"""Session-wide test setup.

Without a CUDA device the Triton kernels run under Triton's interpreter. `TRITON_INTERPRET` is read when a kernel is
decorated, that is when `r1engine.kernels` is first imported, and several test modules import it indirectly while
they are collected (the fused ops, TRL through its Liger integration), so it is set here, before any of them.

Every test also fails when a fast path turned out to be broken while it ran (`_no_broken_fast_path`). The rollout
tests share `one_thread` and `policy`; the benchmarks' tests, `bench`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def bench(request):
    """The script named by the test module's SCRIPT (a benchmark: a file, not a package module), imported."""
    path = request.module.SCRIPT
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _no_broken_fast_path():
    """Fail a test during which a fast path turned out to be broken: installed or built, but failing to import or
    load (r1engine.ops.backends.registry reports it as a warning and takes the slow path, which would otherwise
    pass every test). A fast path that is simply absent here (no triton, no flash-attn, no GPU, no extension) is
    not an error. Tests that simulate a broken one reset the registry before this check runs."""
    registry = sys.modules.get("r1engine.ops.backends.registry")
    before = set(registry.broken()) if registry is not None else set()
    yield
    registry = sys.modules.get("r1engine.ops.backends.registry")
    new = [b for b in registry.broken() if b not in before] if registry is not None else []
    if new:
        lines = "\n".join(f"  {op}: backend {backend!r}: {reason}" for op, backend, reason in new)
        pytest.fail(f"a fast path is broken on this machine (fix the build or the install):\n{lines}", pytrace=False)


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: one intra-op thread per process is several times faster than two under contention (and makes
    a trainer and its rollout worker compute in the same order)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(m0: a tiny policy saved to a directory, that directory, m1: m0 with every weight moved, the MTP layer
    included)."""
    from r1engine.models import PolicyConfig, PolicyModel

    torch.manual_seed(0)
    m0 = PolicyModel(PolicyConfig.tiny(max_position_embeddings=256)).eval()
    path = tmp_path_factory.mktemp("policy")
    m0.save_pretrained(path)
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for _, t in m1.named_weights():
            t.add_(0.05 * torch.randn_like(t))
    return m0, path, m1


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The directory of a tiny policy fitted to the toy pattern: confident logits, so that greedy decoding has no
    near-ties that the rounding of a differently shaped forward could flip."""
    from r1engine.models import PolicyConfig, PolicyModel
    from r1engine.models.toy import fit_pattern

    torch.manual_seed(0)
    model = PolicyModel(PolicyConfig.tiny(max_position_embeddings=256))
    fit_pattern(model, 120, batch=16, length=20, lr=4e-3)
    path = tmp_path_factory.mktemp("fitted")
    model.eval().save_pretrained(path)
    return path
