"""What a reward model reads: the final summary of a reasoning response, and prompts and responses rendered into
token ids with the reward model's own tokenizer.

The helpfulness model judges only the summary after the reasoning (the R1 paper: "we focus only on the final
summary"); the safety model reads the whole response, reasoning included. `final_summary` (kept in
`r1engine.rewards.parsing`, which the `pattern` rule shares) defines the summary:

- a response with a closing `</think>`: the text after the last one, stripped of surrounding whitespace;
- a response that opens `<think>` and never closes it (cut off mid-reasoning): no summary, the empty string;
- a response with neither tag (a general prompt answered without reasoning, a reference answer): all of it.

Rendering (`RewardFormat.template`): "chat" puts the prompt (text, or chat messages) and the response into the
tokenizer's chat template as the user's and the assistant's turns; a pair becomes one user turn showing the question
and both responses (`PAIR_TEMPLATE`), followed by the opening of the assistant's turn. "plain" joins the same texts
with blank lines and encodes them as the tokenizer does (its BOS where it adds one; the character tokenizer's
`<bos>` prepended). Text is always encoded here, by the reward model's tokenizer: a reward model never reads the
policy's token ids, so its tokenizer may differ from the policy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1engine.models.tokenizer import uses_char_vocab
from r1engine.rewards.parsing import final_summary

__all__ = ["PAIR_TEMPLATE", "THINK_CLOSE", "THINK_OPEN", "Renderer", "final_summary", "prompt_text"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

PAIR_TEMPLATE = (
    "[Question]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\nWhich response is more helpful, A or B?"
)
"""The comparison a pair-input model reads (response A is the one whose preference its score gives)."""
SINGLE_TEMPLATE = "{prompt}\n\n{response}"
"""A prompt and a response for a single-input model without a chat template."""


def _messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as chat messages: text is one user turn; a list of {role, content} dicts is taken as it is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in prompt]
    raise TypeError(f"prompt: expected text or a list of chat messages, got {type(prompt).__name__}")


def prompt_text(prompt: Any) -> str:
    """A prompt as text: chat messages joined as `role: content` lines (a lone user turn is its content)."""
    msgs = _messages(prompt)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs)


class Renderer:
    """Prompts and responses as token ids of `tokenizer` (see the module docstring). `template`: "chat", "plain" or
    "auto" (chat when the tokenizer has a chat template)."""

    def __init__(self, tokenizer: Any, template: str = "auto") -> None:
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template: must be one of auto, chat, plain, got {template!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError("template: 'chat' needs a tokenizer with a chat template; this one has none (use plain)")
        self.tokenizer = tokenizer
        self.chat = has_chat if template == "auto" else template == "chat"
        self._bos = [tokenizer.bos_token_id] if uses_char_vocab(tokenizer) else []

    def _encode_text(self, text: str) -> list[int]:
        return self._bos + list(self.tokenizer.encode(text, add_special_tokens=True))

    def _encode_chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
        )
        return list(out["input_ids"])

    def single(self, prompt: Any, response: str) -> list[int]:
        """One prompt and one response."""
        if self.chat:
            return self._encode_chat([*_messages(prompt), {"role": "assistant", "content": response}], False)
        return self._encode_text(SINGLE_TEMPLATE.format(prompt=prompt_text(prompt), response=response))

    def pair(self, prompt: Any, a: str, b: str) -> list[int]:
        """One prompt and two responses in one comparison, `a` shown first."""
        text = PAIR_TEMPLATE.format(prompt=prompt_text(prompt), a=a, b=b)
        if self.chat:
            return self._encode_chat([{"role": "user", "content": text}], True)
        return self._encode_text(text)
