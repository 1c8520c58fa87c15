"""`KVCache`: a preallocated, ragged key/value cache for batched decoding (native rollout engine).

Every row b has its own committed length `lengths[b]`. A forward of T new tokens writes them at positions
`lengths[b] .. lengths[b]+T-1` and lets query t see keys `0 .. lengths[b]+t`. Entries past a row's length are
garbage by design (right padding, rejected speculative drafts) and get overwritten by the next write, so rows that
accept different numbers of drafted tokens never need to be compacted.
"""

from __future__ import annotations

import torch

from r1engine.ops.backends import registry
from r1engine.settings import current as current_settings

_DECODE_ATTENTION = registry.compiled_op("decode_attention")


def _use_decode_kernel(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Single-query steps on the CPU go through the C++ decode-step attention (`torch.ops.r1engine.decode_attention`)
    rather than SDPA with a ragged mask (benchmarks/bench_decode_attention.py measures both), unless
    `r1engine.settings` `decode_attention_kernel` is off; a kernel that is not built is reported once."""
    if not (
        current_settings().decode_attention_kernel
        and q.device.type == "cpu"
        and q.dtype == cache.dtype
        and q.dtype in (torch.float32, torch.bfloat16)
    ):
        return False
    why = _DECODE_ATTENTION()
    if why is not None:
        registry.report("decode_attention", "cpp", why, using="sdpa")
    return why is None


class KVCache:
    """Preallocated `[layers, batch, kv_heads, max_len, head_dim]` keys and values plus per-row lengths."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        # zeros, not empty: masked slots still enter the matmuls, and uninitialised NaN/Inf would leak through them
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # [B, T] row index of each new token (for the cache writes)
        self._used = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin(self, num_new: int) -> torch.Tensor:
        """Prepare a forward of `num_new` tokens per row; returns their positions `[B, num_new]`."""
        pos = self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)[None, :]
        used = int(pos.max().item()) + 1
        if used > self.max_len:
            raise ValueError(f"KVCache overflow: need {used} positions, cache holds max_len={self.max_len}")
        self._pos, self._used = pos, used
        self._rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
        self._mask = None  # built by the first attend that needs it; the decode kernel takes lengths instead
        return pos

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Write `k_new`/`v_new` `[B, T, Hkv, D]` into `layer`, attend `q` `[B, T, Hq, D]` -> `[B, T, Hq, D]`."""
        assert self._pos is not None, "call KVCache.begin() before the forward"
        self.k[layer][self._rows, :, self._pos] = k_new.to(self.k.dtype)
        self.v[layer][self._rows, :, self._pos] = v_new.to(self.v.dtype)
        if q.shape[1] == 1 and _use_decode_kernel(q, self.k):  # one query per row: the decode-step kernel
            scale = q.shape[-1] ** -0.5
            out = torch.ops.r1engine.decode_attention(q[:, 0], self.k[layer], self.v[layer], self._pos[:, 0] + 1, scale)
            return out[:, None]
        if self._mask is None:
            keys = torch.arange(self._used, device=q.device)
            self._mask = (keys[None, None, :] <= self._pos[:, :, None])[:, None]  # [B, 1, T, used]
        k = self.k[layer][:, :, : self._used]
        v = self.v[layer][:, :, : self._used]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=self._mask, enable_gqa=True
        )
        return out.transpose(1, 2)

    def advance(self, n: torch.Tensor | int) -> None:
        """Commit `n` (per row, or for all rows) of the tokens written by the last forward."""
        self.lengths += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (int64 indices, in the new order): finished sequences leave the batch,
        so later forwards stop computing them. An index may repeat (the samples of one prompt each take a copy of
        its prefilled rows). Copies the kept rows' keys and values (`[L, len(rows), ...]`)."""
        rows = rows.to(self.lengths.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self._pos = self._mask = self._rows = None

    def reset(self) -> None:
        """Forget everything (the memory stays allocated)."""
        self.lengths.zero_()
