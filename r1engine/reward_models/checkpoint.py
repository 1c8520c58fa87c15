"""Reward-model directories in and out, in Hugging Face's `*ForSequenceClassification` layout.

In: a `LlamaForSequenceClassification`, `Qwen2ForSequenceClassification` or `Qwen3ForSequenceClassification`
directory (the decoder's `model.*` tensors and `score.weight` `[num_labels, hidden]`, as transformers and TRL's
RewardTrainer write them), or any policy directory the engine loads (`*ForCausalLM`, MiMo, a `.gguf` file): its
decoder with a fresh head (its vocabulary head and MTP layers are not read).

Out: `config.json` of the body's family with `architectures: [<Family>ForSequenceClassification]`, `id2label` /
`label2id` (so transformers knows `num_labels`), `pad_token_id` and the model's `RewardFormat` under
`r1engine_reward`; `model.safetensors` with the Hugging Face names; the tokenizer's files copied from where it was
loaded. `AutoModelForSequenceClassification.from_pretrained(dir)` loads it and scores as `RewardModel` does: at the
last token of each row that is not `pad_token_id`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1engine.models.checkpoint import load_state, read_config, resolve_model_dir, save_tokenizer
from r1engine.models.config import PolicyConfig
from r1engine.models.tokenizer import check_vocab_fits
from r1engine.reward_models.format import FORMAT_KEY, RewardFormat

if TYPE_CHECKING:
    from r1engine.reward_models.model import RewardModel

SEQUENCE_CLASSIFIERS = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
}
"""The `*ForSequenceClassification` architectures read here, and the causal LM of the same body."""
_CLASSIFIER_OF = {causal: cls for cls, causal in SEQUENCE_CLASSIFIERS.items()}


def _read_raw(root: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads((root / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key}: {root}/config.json is not valid JSON ({exc})") from exc


def is_sequence_classifier(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory of a `*ForSequenceClassification` model (of any family)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or [""]
    return str(archs[0]).endswith("ForSequenceClassification")


def load_reward_model(
    cls: type[RewardModel],
    path: str | os.PathLike,
    *,
    num_labels: int | None,
    fmt: RewardFormat | None,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    key: str,
) -> RewardModel:
    """See `RewardModel.from_pretrained`."""
    root = resolve_model_dir(path, key=key)
    raw = _read_raw(root, key)
    arch = str((raw.get("architectures") or [None])[0])
    fresh_head = not arch.endswith("ForSequenceClassification")
    id2label = None
    if fresh_head:  # a policy directory: its body, a new head
        config = read_config(root, key=key)
        n = 1 if num_labels is None else int(num_labels)
        fmt = fmt if fmt is not None else RewardFormat()
    else:
        if arch not in SEQUENCE_CLASSIFIERS:
            raise ValueError(
                f"{key}: architectures[0]: {arch!r} is not supported (supported: {', '.join(SEQUENCE_CLASSIFIERS)}, "
                "or a policy directory)"
            )
        try:
            config = PolicyConfig.from_hf_dict({**raw, "architectures": [SEQUENCE_CLASSIFIERS[arch]]})
        except ValueError as exc:
            raise ValueError(f"{key}: {root}/config.json: {exc}") from exc
        if isinstance(raw.get("id2label"), dict):
            id2label = {int(k): str(v) for k, v in raw["id2label"].items()}
    state = load_state(root)
    body = {k: v for k, v in state.items() if k.startswith("model.") and not k.startswith("model.mtp_layers.")}
    if fresh_head:
        body["score.weight"] = torch.empty(n, config.hidden_size)
    else:
        head = state.get("score.weight")
        if head is None or head.dim() != 2 or head.shape[1] != config.hidden_size:
            got = "none" if head is None else f"shape {tuple(head.shape)}"
            raise ValueError(
                f"{key}: {root} is a {arch} without a score.weight of shape [num_labels, {config.hidden_size}] "
                f"(got {got})"
            )
        n = int(head.shape[0])
        if num_labels is not None and int(num_labels) != n:
            raise ValueError(f"{key}: the checkpoint's head has num_labels={n}, but {num_labels} were asked for")
        body["score.weight"] = head
        if fmt is None:
            stored = raw.get(FORMAT_KEY)
            if isinstance(stored, dict):
                fmt = RewardFormat.from_dict(stored, key=f"{key}: {root}/config.json: {FORMAT_KEY}")
            else:  # a reward model from elsewhere: one response per input; one output is a preference score
                fmt = RewardFormat(kind="pairwise" if n == 1 else "pointwise", input="single")
    try:
        fmt.check_labels(n)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    with torch.device("meta"):
        model = cls(config, n, fmt)
    model.load_hf_state(body, where=str(root))
    model.id2label = id2label
    if fresh_head:
        model.reset_head(seed)
    return model.to(device=device, dtype=dtype)


def reward_config_dict(model: RewardModel) -> dict[str, Any]:
    """The `config.json` of a reward-model checkpoint (see the module docstring)."""
    cfg = model.config.export_hf_dict(keep_mtp=False)
    causal = cfg["architectures"][0]
    cfg["architectures"] = [_CLASSIFIER_OF[causal]]
    labels = model.label_names()
    cfg["id2label"] = {str(i): name for i, name in sorted(labels.items())}
    cfg["label2id"] = {name: i for i, name in sorted(labels.items())}
    cfg["pad_token_id"] = model.config.pad_token_id
    cfg[FORMAT_KEY] = model.fmt.to_dict()
    cfg.pop("num_labels", None)  # transformers derives it from id2label
    cfg["torch_dtype" if "dtype" not in cfg else "dtype"] = str(model.dtype).removeprefix("torch.")
    return cfg


def save_reward_model(model: RewardModel, path: str | os.PathLike, tokenizer: Any = None) -> None:
    """See `RewardModel.save_pretrained`."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        check_vocab_fits(tokenizer, model.config.vocab_size)
    (out / "config.json").write_text(json.dumps(reward_config_dict(model), indent=2))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.hf_state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
