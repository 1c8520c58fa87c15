"""A character-level tokenizer built locally with the `tokenizers` library (no downloads).

Vocabulary: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then "\\n", "\\t" and printable ASCII (space..~), 101 entries.
R1's tags (`<think>`, `<answer>`, ...) stay as plain characters, so any text round-trips exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))


def char_vocab() -> dict[str, int]:
    """Token -> id map of the character tokenizer (specials first)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    return vocab


def build_char_tokenizer(save_dir: str | os.PathLike | None = None):
    """Build a `transformers.PreTrainedTokenizerFast` over single characters; optionally `save_pretrained` it.

    Why character-level: the tests and the demo need a tokenizer without network access whose ids are stable and
    whose vocabulary is small enough for a tiny model; every printable ASCII string encodes and decodes losslessly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = char_vocab()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def check_vocab_fits(tokenizer, vocab_size: int) -> None:
    """Raise if the tokenizer can emit ids the model's embedding table does not have."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}: "
            f"ids >= {vocab_size} would index past the embedding (expected len(tokenizer) <= vocab_size)"
        )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""The files a Hugging Face tokenizer may be saved as (checkpoints copy these from the source unchanged)."""


def load_tokenizer(path: str | os.PathLike, key: str = "model.tokenizer"):
    """The tokenizer saved in a model directory, through transformers' `AutoTokenizer`.

    A directory whose `tokenizer_config.json` names the generic class (`PreTrainedTokenizerFast`, or
    `TokenizersBackend` as transformers 5 writes it: Llama 3, the character tokenizer, converted GGUF files) is loaded
    from its `tokenizer.json` exactly: `AutoTokenizer` would otherwise force the class of the model type, e.g.
    `Qwen2Tokenizer` (a byte-level BPE pre-tokenizer) on a `model_type: qwen2` directory, which silently drops the
    character tokenizer's whitespace.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root = Path(path).expanduser()
    if not root.is_dir() or not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{key}: {str(root)!r} holds no tokenizer files (expected tokenizer.json, tokenizer_config.json, "
            "tokenizer.model or vocab.json)"
        )
    config = root / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") and (root / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(root))
    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as exc:  # transformers raises many types here; the user needs the path and the cause
        raise ValueError(f"{key}: cannot load the tokenizer in {root}: {type(exc).__name__}: {exc}") from exc


def uses_char_vocab(tokenizer) -> bool:
    """True for the character tokenizer of the built-in tasks (it has no BOS post-processor: see `TextCodec`)."""
    return len(tokenizer) == len(CHARS) + len(SPECIAL_TOKENS) and tokenizer.get_vocab() == char_vocab()


def stop_token_ids(tokenizer, *configs: dict | None) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS and the `eos_token_id` (an int or a list) of each config given
    (`generation_config.json` and `config.json`), in that order, without repeats."""
    ids: list[int] = []
    candidates: list = [tokenizer.eos_token_id]
    for cfg in configs:
        eos = (cfg or {}).get("eos_token_id")
        candidates.extend(eos if isinstance(eos, list) else [eos])
    for i in candidates:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError(
            "the tokenizer has no eos_token and the model configs name no eos_token_id: generation could never stop "
            "(set eos_token in the tokenizer or eos_token_id in generation_config.json)"
        )
    return ids


class TextCodec:
    """Text <-> token ids the way the trainer feeds the model.

    A prompt (text, or chat messages) goes through the prompt template (`r1engine.data.templates`; plain text by
    default): rendered text is encoded as the tokenizer says (`add_special_tokens=True`: Llama 3 adds its BOS, Qwen
    and SmolLM2 add nothing), rendered messages through the tokenizer's chat template with the assistant's turn
    opened; the character tokenizer, which has no post-processor, gets its `<bos>` prepended. Completions are
    generated until any of `stop_ids`, and decoding drops special tokens."""

    def __init__(self, tokenizer, stop_ids: list[int] | None = None, template=None):
        from r1engine.data.templates import PromptTemplate, TemplateError

        self.template = template if template is not None else PromptTemplate("plain")
        if self.template.uses_chat and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"data.template: {self.template.spec!r} needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids) if stop_ids else stop_token_ids(tokenizer)
        self.eos_id = self.stop_ids[0]
        self._prepend_bos = uses_char_vocab(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, prompt, bos: bool = True) -> list[int]:
        """Token ids of a prompt (`bos=True`: templated, special tokens as the tokenizer adds them) or of a
        continuation's text (`bos=False`: the text alone)."""
        if not bos:
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        rendered = self.template.render(prompt)
        if not isinstance(rendered, str):
            out = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, return_dict=True)
            return list(out["input_ids"])
        if self._prepend_bos:
            return [self.tokenizer.bos_token_id] + self.tokenizer.encode(rendered, add_special_tokens=False)
        return self.tokenizer.encode(rendered, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        stops = set(self.stop_ids)
        return self.tokenizer.decode([i for i in ids if i not in stops], skip_special_tokens=True)
