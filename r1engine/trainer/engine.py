"""The optimizer side of training: plain PyTorch AdamW in one process, or DeepSpeed ZeRO (stages 1-3, optional
CPU offload of the optimizer state) across processes. The trainer only calls `backward`, `step` and the
weight accessors, so both behave the same to it."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from r1engine.optim import FusedAdamW, clip_coefficient
from r1engine.trainer.distributed import rank, world_size


def deepspeed_config(
    lr: float, weight_decay: float, max_grad_norm: float, zero_stage: int, offload_optimizer: bool
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True},
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class TrainEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        zero_stage: int = 0,
        offload_optimizer: bool = False,
    ):
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.zero_stage = zero_stage
        self.ds_engine = None
        if zero_stage == 0:
            # Not torch.optim.AdamW: one fused C++ pass per parameter (r1engine.optim), with the clip folded in.
            self.optimizer = FusedAdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            import deepspeed

            os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
            config = deepspeed_config(lr, weight_decay, max_grad_norm, zero_stage, offload_optimizer)
            self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=config
            )

    @property
    def world_size(self) -> int:
        return world_size()

    @property
    def rank(self) -> int:
        return rank()

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        if self.ds_engine is not None:
            self.ds_engine.step()
            norm = self.ds_engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = self.optimizer.grad_norm()
        self.optimizer.step(grad_scale=clip_coefficient(norm, self.max_grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @contextlib.contextmanager
    def full_weights(self):
        """Context in which `self.model`'s parameters are complete on this rank (gathers ZeRO-3 partitions)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield self.model
        else:
            yield self.model

    def optimizer_state(self) -> dict[str, Any] | None:
        """Optimizer state for a single-process checkpoint (DeepSpeed checkpoints its own, see save_sharded)."""
        return self.optimizer.state_dict() if self.ds_engine is None else None

    def load_optimizer_state(self, state: dict[str, Any] | None) -> None:
        if state is not None and self.ds_engine is None:
            self.optimizer.load_state_dict(state)

    def save_sharded(self, directory: str) -> None:
        """DeepSpeed's own (per-rank, partitioned) optimizer checkpoint; a no-op without DeepSpeed."""
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(directory, tag="ds")

    def load_sharded(self, directory: str) -> None:
        if self.ds_engine is not None:
            self.ds_engine.load_checkpoint(directory, tag="ds", load_module_strict=True)
