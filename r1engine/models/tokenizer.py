"""A character-level tokenizer built locally with the `tokenizers` library (no downloads).

Vocabulary: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then "\\n", "\\t" and printable ASCII (space..~), 101 entries.
R1's tags (`<think>`, `<answer>`, ...) stay as plain characters, so any text round-trips exactly.
"""

from __future__ import annotations

import os

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


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer saved in a model directory, exactly as it was built.

    Use this rather than `AutoTokenizer`: transformers 5 forces `Qwen2Tokenizer` (byte-level BPE pre-tokenizer) on
    any directory whose config.json says `model_type: qwen2`, which silently drops whitespace of the char tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


class TextCodec:
    """Text <-> token ids the way the trainer feeds the model: a prompt starts with BOS, a completion is
    generated until EOS, and decoding drops EOS."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True)
