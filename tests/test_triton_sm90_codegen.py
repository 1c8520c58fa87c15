"""Compile the Triton GRPO kernels for sm_90 (H100) without a GPU and check the generated code.

The interpreter tests check the math; this checks what only the compiler shows: every kernel lowers for sm_90 (with
and without the entropy), the logits-in kernels use 16-byte vector loads/stores when V and the row stride are
multiples of 16 (as triton's runtime specialization tells the compiler for V = 151936), and the lm_head GEMM K loop
is software-pipelined (shared memory holds `num_stages` stages of the X and W tiles), uses wgmma and does not spill.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = r"""
import inspect, json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from r1engine.kernels import grpo_loss as K, linear_grpo_loss as L

target = GPUTarget("cuda", 90, 32)
out = {}

def build(fn, types, consts, divisible, **opts):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types(n)) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in divisible}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                          options=opts)

def logits_types(n):
    if n in ("logits_ptr", "grad_ptr"):
        return "*bf16"
    if n == "targets_ptr":
        return "*i64"
    if n.endswith("_ptr"):
        return "*fp32"
    return "i64" if n.startswith("stride") else "i32" if n == "V" else "fp32"

div = {"logits_ptr", "grad_ptr", "targets_ptr", "stride_row", "stride_grad", "V"}
for ent in (False, True):
    k = build(K._logprobs_fwd_kernel, logits_types, dict(HAS_LIVE=True, ENTROPY=ent, BLOCK_V=4096), div, num_warps=8)
    out[f"fwd_ld_v4_{ent}"] = len(re.findall(r"ld\.global[.a-z0-9]*\.v4", k.asm["ptx"]))
    k = build(K._logprobs_bwd_kernel, logits_types, dict(HAS_ENT=ent, BLOCK_V=4096), div, num_warps=8)
    out[f"bwd_ld_v4_{ent}"] = len(re.findall(r"ld\.global[.a-z0-9]*\.v4", k.asm["ptx"]))
    out[f"bwd_st_v4_{ent}"] = len(re.findall(r"st\.global[.a-z0-9]*\.v4", k.asm["ptx"]))

cfg = L.default_config(__import__("torch").bfloat16, __import__("torch").device("cuda"))
consts = dict(BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, IEEE=False, GROUP_M=cfg.group_m)

def linear_types(n):
    if n in ("x_ptr", "w_ptr", "out_ptr"):
        return "*bf16"
    if n == "targets_ptr":
        return "*i64"
    if n.endswith("_ptr"):
        return "*fp32"
    return "fp32" if n == "inv_t" else "i32"

ldiv = {"x_ptr", "w_ptr", "out_ptr", "H", "stride_x", "stride_w", "stride_out"}
stage_bytes = (cfg.bm + cfg.bn) * cfg.bk * 2
variants = []
for ent in (False, True):  # the entropy (forward) and its gradient term (dlogits) on and off
    variants.append((f"lin_fwd_{ent}", L._fwd_kernel, dict(consts, ENTROPY=ent)))
    variants.append((f"lin_dlogits_{ent}", L._dlogits_kernel, dict(consts, HAS_ENT=ent)))
for name, fn, kconsts in variants:
    k = build(fn, linear_types, kconsts, ldiv, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out[name + "_stages"] = k.metadata.shared / stage_bytes
    out[name + "_wgmma"] = "wgmma" in k.asm["ptx"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        import subprocess, tempfile
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"STACK:(\d+)", usage)
        out[name + "_stack"] = int(m.group(1)) if m else None
out["num_stages"] = cfg.num_stages
for kern in (K._logprobs_fwd_kernel, K._logprobs_bwd_kernel):
    names = list(inspect.signature(kern.fn).parameters)
    out["dns_" + kern.fn.__name__] = sorted(names[i] if isinstance(i, int) else i for i in kern.do_not_specialize)
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_with_vector_loads_and_pipelining():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"triton's NVIDIA backend is missing ({exc}); it ships with the triton wheel")
    # A fresh interpreter: TRITON_INTERPRET must be unset when the kernels are decorated.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for ent in (False, True):  # with and without the entropy (term)
        assert res[f"fwd_ld_v4_{ent}"] >= 1, res  # 16-byte loads of the logits row
        assert res[f"bwd_ld_v4_{ent}"] >= 1 and res[f"bwd_st_v4_{ent}"] >= 1, res  # 16-byte loads and stores
        for name in (f"lin_fwd_{ent}", f"lin_dlogits_{ent}"):
            assert res[name + "_wgmma"], res  # Hopper tensor cores
            assert res[name + "_stages"] >= res["num_stages"] - 0.01, res  # K loop pipelined num_stages deep
            assert res.get(name + "_stack") in (0, None), res  # no register spills (None: cuobjdump not shipped)
    # the temperature never specializes (no recompile per value, no fp64); strides and V must specialize
    assert res["dns__logprobs_fwd_kernel"] == ["temperature"] == res["dns__logprobs_bwd_kernel"], res
