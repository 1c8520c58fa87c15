"""Prompt templates (`data.template`): how a problem's prompt becomes the text or chat messages the model reads.

    plain          the prompt text as it is
    chat           one user message in the tokenizer's chat template (after `data.system_prompt`, if any), the
                   assistant's turn opened; a prompt that is already a list of messages goes in as it is
    r1_zero        DeepSeek-R1-Zero's template as plain text ("A conversation between User and Assistant. ...
                   User: {prompt}. Assistant:"), which asks for <think> ... </think> <answer> ... </answer>
    r1_zero_chat   the same instruction as the system message of the chat template, the prompt as the user's
    any string     a custom template with a `{prompt}` field, as plain text

A template that ends inside the thought (its text ends with "<think>") makes the format reward expect a completion
that starts inside the thought (`think_in_prompt`).
"""

from __future__ import annotations

from typing import Any

R1_ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
R1_ZERO = R1_ZERO_INSTRUCTION + " User: {prompt}. Assistant:"
NAMED = ("plain", "chat", "r1_zero", "r1_zero_chat")


class TemplateError(ValueError):
    """A template that cannot be used; the message names `data.template` or `data.system_prompt`."""


def _user_text(prompt: Any) -> str:
    """The text of a prompt: itself, or the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise TemplateError(f"data.template: a chat prompt without a user message: {str(prompt)[:120]!r}")
    return users[-1]


def is_messages(prompt: Any) -> bool:
    """True for a chat prompt: a list of `{"role", "content"}` dicts."""
    return isinstance(prompt, list | tuple) and all(isinstance(m, dict) and "role" in m for m in prompt)


class PromptTemplate:
    """One of the templates above (see the module docstring); `render` gives text (str) or chat messages (list)."""

    def __init__(self, spec: str = "plain", system_prompt: str | None = None) -> None:
        if spec not in NAMED and "{prompt}" not in spec:
            raise TemplateError(
                f"data.template: must be one of {', '.join(NAMED)} or a string with a {{prompt}} field, got {spec!r}"
            )
        if spec not in NAMED:
            try:
                spec.format(prompt="")
            except (KeyError, IndexError, ValueError) as exc:
                raise TemplateError(
                    f"data.template: {spec!r} has fields other than {{prompt}} (write literal braces as {{{{ }}}})"
                ) from exc
        if system_prompt is not None and spec not in ("chat", "r1_zero_chat"):
            raise TemplateError(
                f"data.system_prompt: applies to the chat templates (chat, r1_zero_chat), not to {spec!r}"
            )
        self.spec, self.system_prompt = spec, system_prompt

    @property
    def uses_chat(self) -> bool:
        """Whether the tokenizer's chat template renders the prompt."""
        return self.spec in ("chat", "r1_zero_chat")

    @property
    def think_in_prompt(self) -> bool:
        """Whether the prompt ends inside the thought (so a completion must not open <think> again)."""
        text = R1_ZERO if self.spec == "r1_zero" else self.spec
        return text.rstrip().endswith("<think>")

    def render(self, prompt: Any) -> str | list[dict[str, str]]:
        """The text (plain templates) or the messages (chat templates) for one problem's prompt."""
        if self.spec == "chat":
            messages = list(prompt) if is_messages(prompt) else [{"role": "user", "content": prompt}]
            has_system = any(m.get("role") == "system" for m in messages)
            if self.system_prompt and not has_system:
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            return messages
        if self.spec == "r1_zero_chat":
            system = R1_ZERO_INSTRUCTION if not self.system_prompt else f"{R1_ZERO_INSTRUCTION} {self.system_prompt}"
            return [{"role": "system", "content": system}, {"role": "user", "content": _user_text(prompt)}]
        text = _user_text(prompt)
        if self.spec == "plain":
            return text
        return (R1_ZERO if self.spec == "r1_zero" else self.spec).format(prompt=text)
