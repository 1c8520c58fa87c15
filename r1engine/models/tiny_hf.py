"""Tiny random Hugging Face checkpoints of each supported family, made with transformers itself, with a byte-level
BPE tokenizer trained here (no hub access needed): what the tests compare the engine's policy against, and what a
user can try the Hugging Face path on before bringing a real checkpoint.

    python -m r1engine.models.tiny_hf llama runs/tiny-llama      # or qwen2, qwen3 (see `--help`)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "llama", "qwen3")

# Text the BPE merges are learned from: the prompts and answers of the built-in tasks and the R1 template, so that
# their tokens are short and every byte still has a token (byte-level BPE encodes any text).
_CORPUS = [
    "What is 17 + 25? The answer is 42.",
    "347+85=<think>7+5+0=12 4+8+1=13 3+0+1=4</think><answer>432</answer>",
    "<think>ones 7+5+0=12 tens 4+8+1=13 hundreds 3+0+1=4</think> <answer>432</answer>",
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
    "0123456789 + - * / = ( ) , . ? !",
]
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_bpe_tokenizer(style: str = "qwen", vocab_size: int = 320):
    """A byte-level BPE tokenizer of `vocab_size` tokens. style "qwen": `Qwen2Tokenizer`, no BOS, EOS `<|im_end|>`;
    "llama": `PreTrainedTokenizerFast` (as Llama 3 ships), BOS `<|begin_of_text|>` added to every encoding."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 20, vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL))
    if style == "qwen":
        model = json.loads(bpe._tokenizer.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    elif style == "llama":
        core = bpe._tokenizer
        bos = "<|begin_of_text|>"
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))]
        )
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="<|im_end|>")
    else:
        raise ValueError(f"style must be 'qwen' or 'llama', got {style!r}")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int = 320, **overrides: Any):
    """A small transformers config of `family` with odd sizes and GQA (overrides replace any field)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    base: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=72,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "qwen2":
        cls, base = Qwen2Config, {**base, "rope_theta": 10000.0}
    elif family == "llama":  # head_dim other than hidden / heads, llama3 RoPE scaling (as Llama 3.1+ ship)
        rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
        cls, base = LlamaConfig, {**base, "head_dim": 16, "rope_parameters": rope}
    elif family == "qwen3":  # q/k norms and an explicit head_dim
        cls, base = Qwen3Config, {**base, "head_dim": 16, "rope_theta": 1000000.0}
    else:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    base.update(overrides)
    return cls(**base)


def make_tiny_hf_model(family: str, out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a random `family` model (transformers' own class and initialisation, norms and biases perturbed so
    every weight matters) with its BPE tokenizer and generation config to `out_dir`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = build_bpe_tokenizer("llama" if family == "llama" else "qwen")
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    overrides = {"vocab_size": len(tok), **ids, **overrides}
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(**ids).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_hf_model(args.family, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
