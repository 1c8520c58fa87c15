"""`RewardModel`: a policy body of any family the engine loads plus a scalar (or classifier) head, read at each
sequence's last token: the architecture of Hugging Face's `*ForSequenceClassification` and of DeepSeek-R1's reward
models ("the DeepSeek-R1 architecture with a reward head").

The body is a `PolicyModel` without MTP layers whose vocabulary head is an identity (a reward model never reads
token logits), so it holds exactly the decoder's parameters and runs the policy's own packed varlen forward: one
packed row of several sequences (`cu_seqlens`), attention inside each, no compute on padding. `score` is
`Linear(hidden, num_labels, bias=False)`, the `score.weight` of transformers' `LlamaForSequenceClassification`,
`Qwen2ForSequenceClassification` and `Qwen3ForSequenceClassification`.

How the model is used (`r1engine.reward_models.format.RewardFormat`) travels with it and its checkpoints. Directories
in and out: see `r1engine.reward_models.checkpoint`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from r1engine.models.config import PolicyConfig
from r1engine.models.policy import PolicyModel
from r1engine.reward_models import checkpoint
from r1engine.reward_models.format import RewardFormat

__all__ = ["RewardFormat", "RewardModel"]


class RewardModel(nn.Module):
    """A decoder body and a `score` head read at each sequence's last token; see the module docstring.

    `config`: the body's `PolicyConfig` (its MTP layers are dropped). `num_labels`: outputs of the head (1 for a
    preference model or a one-logit classifier). `fmt`: how the model is used (stored with its checkpoints).
    """

    def __init__(self, config: PolicyConfig, num_labels: int = 1, fmt: RewardFormat | None = None) -> None:
        super().__init__()
        if int(num_labels) < 1:
            raise ValueError(f"num_labels: must be >= 1, got {num_labels}")
        self.fmt = fmt if fmt is not None else RewardFormat()
        self.fmt.check_labels(int(num_labels))
        self.config = config.replace(num_mtp_layers=0)
        self.num_labels = int(num_labels)
        self.body = PolicyModel(self.config)
        self.body.lm_head = nn.Identity()  # hidden states are all a reward model reads
        self.score = nn.Linear(self.config.hidden_size, self.num_labels, bias=False)
        self.id2label: dict[int, str] | None = None
        """Label names as the source `config.json` had them (written back unchanged); None: named from `fmt`."""
        if not self.score.weight.is_meta:
            self.reset_head()

    # -------------------------------------------------------------------------------------------- construction
    def reset_head(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) head weights, as transformers initialises `score`."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.score.weight.shape, generator=gen) * self.config.initializer_range
            self.score.weight.copy_(w.to(self.score.weight))

    def keep_layers(self, num_layers: int) -> RewardModel:
        """Keep the first `num_layers` decoder layers of the body (in place; returns self): a smaller, faster reward
        model from a deep pretrained checkpoint, whose lower layers already hold the lexical features a narrow
        preference needs. The final norm stays; the checkpoint it saves has `num_layers` layers."""
        total = len(self.body.model.layers)
        if not 1 <= int(num_layers) <= total:
            raise ValueError(f"num_layers: must be in [1, {total}] (the body's layers), got {num_layers}")
        self.body.model.layers = self.body.model.layers[: int(num_layers)]
        self.config = self.config.replace(num_layers=int(num_layers))
        self.body.config = self.config
        return self

    @classmethod
    def from_policy(
        cls, policy: PolicyModel, num_labels: int = 1, fmt: RewardFormat | None = None, seed: int = 0
    ) -> RewardModel:
        """A reward model whose body is a copy of `policy`'s decoder (MTP layers and vocabulary head left out) with a
        fresh head: how an RM starts from the policy or any checkpoint the engine loads."""
        if not isinstance(policy, PolicyModel):
            raise TypeError(f"policy: expected a PolicyModel, got {type(policy).__name__}")
        weight = policy.model.embed_tokens.weight
        with torch.device("meta"):
            rm = cls(policy.config, num_labels, fmt)
        rm.to_empty(device=weight.device)
        body = {k: v for k, v in policy.model.state_dict().items() if not k.startswith("mtp_layers.")}
        rm.body.model.load_state_dict(body)
        rm.to(dtype=weight.dtype)
        rm.reset_head(seed)
        return rm

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        num_labels: int | None = None,
        fmt: RewardFormat | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        key: str = "path",
    ) -> RewardModel:
        """Load a `*ForSequenceClassification` directory (Llama, Qwen2, Qwen3; `score.weight` read as it is) or a
        policy directory the engine loads (a `*ForCausalLM` or MiMo checkpoint, a `.gguf` file: its body plus a
        fresh head of `num_labels` outputs, 1 by default). `fmt` overrides the checkpoint's `r1engine_reward`.
        Errors name `key`."""
        return checkpoint.load_reward_model(
            cls, path, num_labels=num_labels, fmt=fmt, dtype=dtype, device=device, seed=seed, key=key
        )

    def save_pretrained(self, path: str | os.PathLike, tokenizer: Any = None) -> None:
        """Write a Hugging Face `*ForSequenceClassification` directory of the body's family (transformers'
        `AutoModelForSequenceClassification` loads it and scores as this model does), the tokenizer's files beside."""
        checkpoint.save_reward_model(self, path, tokenizer)

    # -------------------------------------------------------------------------------------------- state
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under their Hugging Face names (`model.*`, `score.weight`)."""
        state = {k.removeprefix("body."): v for k, v in self.state_dict().items() if not k.startswith("body.lm_head")}
        return state

    def load_hf_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Take the tensors of `state` (Hugging Face names) strictly, assigning them (no copy): missing or unexpected
        tensors raise naming `where`."""
        ours = {f"body.{k}" if k.startswith("model.") else k: v for k, v in state.items()}
        missing, unexpected = self.load_state_dict(ours, strict=False, assign=True)
        missing = [k.removeprefix("body.") for k in missing]
        unexpected = [k.removeprefix("body.") for k in unexpected]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {where} does not match its config.json: missing tensors {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.score.weight.dtype

    @property
    def pad_token_id(self) -> int | None:
        """The id transformers' `*ForSequenceClassification` skips when it looks for a row's last token."""
        return self.config.pad_token_id

    # -------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Head outputs `[S, num_labels]` (float32), one row per sequence, read at its last token.

        Packed: `input_ids` `[total]` (or `[1, total]`) with `cu_seqlens` `[S + 1]`; positions restart at 0 per
        sequence. Padded: `input_ids` `[B, T]` right-padded with `lengths` `[B]` (each row's real tokens; the causal
        mask keeps them from seeing the padding after them).
        """
        if cu_seqlens is not None:
            if lengths is not None:
                raise ValueError("give cu_seqlens (packed) or lengths (padded), not both")
            ids = input_ids.reshape(-1)
            cu = cu_seqlens.to(device=ids.device)
            if cu.numel() < 2 or bool((cu[1:] <= cu[:-1]).any()):
                raise ValueError(f"cu_seqlens: every sequence needs at least one token, got {cu.tolist()}")
            hidden = self.body(ids, position_ids=position_ids, cu_seqlens=cu, max_seqlen=max_seqlen).hidden
            last = hidden[(cu[1:] - 1).long()]
        else:
            if input_ids.dim() != 2 or lengths is None:
                raise ValueError(
                    f"input_ids: expected a packed [total] row with cu_seqlens, or a padded [B, T] batch with lengths; "
                    f"got shape {tuple(input_ids.shape)}{' without lengths' if lengths is None else ''}"
                )
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
            if lengths.shape != input_ids.shape[:1] or bool((lengths < 1).any() | (lengths > input_ids.shape[1]).any()):
                raise ValueError(
                    f"lengths: expected [{input_ids.shape[0]}] values in [1, {input_ids.shape[1]}], got "
                    f"{lengths.tolist()}"
                )
            hidden = self.body(input_ids, position_ids=position_ids).hidden
            last = hidden[torch.arange(input_ids.shape[0], device=hidden.device), lengths - 1]
        return self.score(last).float()

    def safe_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """The log-odds of "safe" `[S]` from a pointwise classifier's outputs `[S, num_labels]` (one logit: itself;
        two: safe's minus unsafe's, whose sigmoid is the softmax probability of safe)."""
        if self.num_labels == 1:
            return logits[:, 0]
        s = self.safe_index
        return logits[:, s] - logits[:, 1 - s]

    @property
    def safe_index(self) -> int:
        """The output that means "safe" in a two-logit classifier."""
        if self.fmt.safe_label is not None:
            return int(self.fmt.safe_label)
        for i, name in (self.id2label or {}).items():
            if str(name).lower() == "safe":
                return int(i)
        return 1

    def label_names(self) -> dict[int, str]:
        """`id2label` for the checkpoint: the source's, else from the format."""
        if self.id2label is not None:
            return dict(self.id2label)
        if self.fmt.kind == "pairwise":
            return {0: "preference"}
        return {0: "safe"} if self.num_labels == 1 else {0: "unsafe", 1: "safe"}
