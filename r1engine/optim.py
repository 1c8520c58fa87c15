"""A fused AdamW that steps CPU parameters in one C++ pass and keeps PyTorch's compiler stack out of the process.

Why not `torch.optim.AdamW`: constructing any `torch.optim.Optimizer` imports `torch._dynamo` (its
`add_param_group` is wrapped by `torch._disable_dynamo`, which imports dynamo on first call), and with it sympy and
the inductor/triton front end: about 144 MiB of resident memory in every CPU training process (measured in
benchmarks/results/optim.md) for an optimizer that never compiles anything. `FusedAdamW` therefore does NOT
subclass `torch.optim.Optimizer`; it is a small duck-typed optimizer with the same hyperparameters, `param_groups`,
`state`, `step()`, `zero_grad()` and a `state_dict()` in `torch.optim.AdamW`'s format (either can load the
other's). The one thing this costs: `torch.optim.lr_scheduler` classes check `isinstance(optimizer, Optimizer)`
and refuse it; set `group["lr"]` (or `optimizer.lr`) yourself, as a scheduler would.

Backends (per tensor, decided at each step):
  cpp    torch.ops.r1engine.adamw_step_ (csrc/core/adamw.*): one read of param, grad and both moments and one
         write of param and moments per element, AVX2 + OpenMP; for contiguous float32 / bfloat16 CPU tensors.
  torch  the same math with torch._foreach_* ops (any device and dtype; also the reference for bf16 parameters).
`backend="auto"` uses `cpp` where the extension is built and the tensor qualifies, else `torch` (`FUSED_ADAMW` in
r1engine.ops.backends.registry, which logs once why `cpp` was passed over when the extension lacks it).

The optimizer state (exp_avg, exp_avg_sq) is float32 whatever the parameter dtype: a bfloat16 model keeps
full-precision moments and only the parameter is rounded after each update (torch.optim.AdamW keeps bf16 moments).

Gradient clipping: `clip_grad_norm_(max_norm)` is `torch.nn.utils.clip_grad_norm_` over the optimizer's
parameters (scales the gradients in place, returns the norm before clipping). `grad_norm()` + `step(grad_scale=)`
do the same without writing the gradients: the scale is applied inside the fused step, which saves one read and
one write of every gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from r1engine import _ext
from r1engine.ops.backends import registry

__all__ = ["FUSED_ADAMW", "FusedAdamW", "clip_coefficient"]

FUSED_ADAMW = registry.register(
    "fused_adamw",
    [
        registry.Backend(
            "cpp",
            "torch.ops.r1engine.adamw_step_ for contiguous float32 / bfloat16 CPU tensors (the others take torch)",
            check=registry.compiled_op("adamw_step_"),
        ),
        registry.Backend("torch", "torch._foreach_* ops, any device and dtype"),
    ],
)

_HYPER = ("lr", "betas", "eps", "weight_decay")


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies the gradients by: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (total_norm + 1e-6))


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr: expected a value >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas: expected two values in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: expected a value >= 0, got {weight_decay}")


class FusedAdamW:
    """AdamW (decoupled weight decay, bias correction; amsgrad=False, maximize=False) with torch.optim.AdamW's
    hyperparameters and defaults. `params` is an iterable of tensors or of dicts (parameter groups with their own
    hyperparameters), as for torch optimizers."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        backend: str = "auto",
    ):
        use = FUSED_ADAMW.resolve(backend)
        if backend == "cpp":
            _ext.require("adamw_step_")
        self.backend = backend
        self._use_cpp = use == "cpp"
        self.defaults: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        _check_hyper(lr, tuple(betas), eps, weight_decay)
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[torch.Tensor, dict[str, Any]] = {}
        groups = list(params)
        if not groups:
            raise ValueError("params: expected at least one parameter, got an empty iterable")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ----------------------------------------------------------------------------------------------- groups
    def add_param_group(self, group: dict[str, Any]) -> None:
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}]: expected a torch.Tensor, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"params[{i}]: can't optimize a non-leaf tensor")
            if id(p) in seen:
                raise ValueError(f"params[{i}]: appears in more than one parameter group (or twice)")
            seen.add(id(p))
        new = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}, "params": params}
        new["betas"] = tuple(new["betas"])
        _check_hyper(new["lr"], new["betas"], new["eps"], new["weight_decay"])
        self.param_groups.append(new)

    @property
    def lr(self) -> float:
        """The learning rate of the first group; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    # ----------------------------------------------------------------------------------------------- step
    def _qualifies_cpp(self, p: torch.Tensor) -> bool:
        g = p.grad
        return (
            self._use_cpp
            and p.device.type == "cpu"
            and p.dtype in (torch.float32, torch.bfloat16)
            and p.is_contiguous()
            and g.dtype == p.dtype
            and not g.is_sparse
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float = 1.0) -> Any:
        """One AdamW step of every parameter that has a gradient (the others are left alone, their step count
        too). `grad_scale` multiplies the gradients inside the step (e.g. a clip coefficient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            cpp: list[torch.Tensor] = []
            other: list[torch.Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {
                        "step": 0,
                        "exp_avg": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
                        "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
                    }
                state["step"] += 1
                (cpp if self._qualifies_cpp(p) else other).append(p)
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if cpp:
                torch.ops.r1engine.adamw_step_(
                    cpp,
                    [p.grad.contiguous() for p in cpp],
                    [self.state[p]["exp_avg"] for p in cpp],
                    [self.state[p]["exp_avg_sq"] for p in cpp],
                    [self.state[p]["step"] for p in cpp],
                    *hyper,
                    float(grad_scale),
                )
            if other:
                _foreach_adamw(other, [self.state[p] for p in other], *hyper, grad_scale)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    # ----------------------------------------------------------------------------------------------- clipping
    @torch.no_grad()
    def grad_norm(self) -> float:
        """Global L2 norm of all gradients (as one vector), in double precision; inf/nan if any is non-finite."""
        grads = [p.grad for p in self._params_with_grad()]
        if not grads:
            return 0.0
        fast: list[torch.Tensor] = []
        rest: list[torch.Tensor] = []
        for g in grads:
            cpu_float = g.device.type == "cpu" and g.dtype in (torch.float32, torch.bfloat16) and not g.is_sparse
            (fast if self._use_cpp and cpu_float else rest).append(g)
        total = torch.ops.r1engine.grad_sq_norm([g.contiguous() for g in fast]) if fast else 0.0
        if rest:
            total += sum(float(n) ** 2 for n in torch._foreach_norm(rest, 2))
        return math.sqrt(total)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the optimizer's parameters: scales the gradients in place so that
        their global norm is at most `max_norm`; returns the norm before clipping."""
        norm = self.grad_norm()
        grads = [p.grad for p in self._params_with_grad()]
        if grads:
            torch._foreach_mul_(grads, clip_coefficient(norm, max_norm))
        return norm

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}: torch.optim.AdamW's layout
        (parameters numbered in group order, step as a float32 scalar tensor). Tensors are references."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {
            index[id(p)]: {
                "step": torch.tensor(float(s["step"]), dtype=torch.float32),
                "exp_avg": s["exp_avg"],
                "exp_avg_sq": s["exp_avg_sq"],
            }
            for p, s in self.state.items()
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of FusedAdamW or torch.optim.AdamW (amsgrad=False); moments are copied to float32 on
        each parameter's device. Keys of torch's groups that FusedAdamW has no use for (foreach, fused, ...) are
        ignored."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        params: dict[int, torch.Tensor] = {}
        for i, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict: parameter group {i} has {len(saved['params'])} parameters, "
                    f"this optimizer's has {len(group['params'])}"
                )
            if saved.get("amsgrad") or saved.get("maximize"):
                raise ValueError(f"state_dict: parameter group {i} uses amsgrad/maximize, which FusedAdamW lacks")
            params.update(zip(saved["params"], group["params"], strict=True))
        for saved, group in zip(groups, self.param_groups, strict=True):
            for key in _HYPER:
                if key in saved:
                    group[key] = tuple(saved[key]) if key == "betas" else saved[key]
        self.state = {}
        for key, s in state_dict["state"].items():
            p = params[int(key)]
            step = s["step"]
            moments = {}
            for name in ("exp_avg", "exp_avg_sq"):
                if s[name].shape != p.shape:
                    raise ValueError(
                        f"state_dict: state[{key}][{name!r}] has shape {tuple(s[name].shape)}, "
                        f"expected {tuple(p.shape)}"
                    )
                moments[name] = torch.empty_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                moments[name].copy_(s[name])
            self.state[p] = {"step": int(step.item() if isinstance(step, torch.Tensor) else step), **moments}

    def __repr__(self) -> str:
        lines = [f"FusedAdamW (backend={self.backend}, cpp={self._use_cpp})"]
        for i, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={g[k]}" for k in _HYPER)
            lines.append(f"  group {i}: {len(g['params'])} tensors, {hyper}")
        return "\n".join(lines)


def _foreach_adamw(
    params: list[torch.Tensor],
    states: list[dict[str, Any]],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float,
) -> None:
    """The torch backend: torch.optim.AdamW's foreach algorithm on float32 copies of non-float32 parameters."""
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    work = [p if p.dtype == torch.float32 else p.float() for p in params]
    grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
    if grad_scale != 1.0:
        grads = torch._foreach_mul(grads, grad_scale)
    if weight_decay != 0.0:
        torch._foreach_mul_(work, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    steps = [s["step"] for s in states]
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    bc2_sqrt = [(1.0 - beta2**t) ** 0.5 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, exp_avgs, denom, step_sizes)
    for p, w in zip(params, work, strict=True):
        if w is not p:
            p.copy_(w)
