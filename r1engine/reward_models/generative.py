"""A generative judge (LLM-as-a-judge): a causal language model asked which of two responses is more helpful, for
pairwise helpfulness rewards without a trained reward model.

    judge = GenerativeJudge.from_pretrained("models/SmolLM2-135M-Instruct")           # backend "hf" or "vllm"
    helpful = GenerativeHelpfulness(judge, pairing="round_robin")
    rewards = helpful(prompts, groups)                  # rewards[g][i], as PairwiseHelpfulness gives them

The judge reads one comparison rendered from `template` (`DEFAULT_TEMPLATE`: the question, response A, response B,
then "Which response is more helpful? Answer with A or B."): through its tokenizer's chat template as one user turn
followed by the opening of the assistant's turn, or, for a tokenizer without one, as plain text followed by
`PLAIN_ANSWER_CUE`. Its verdict is

    f(A, B) = log P("A") - log P("B")

of the first answer token, read teacher-forced from the logits after the prompt: nothing is sampled, so the same
inputs give the same verdict. The letters are the tokenizer's single-token encodings of "A" and "B" as they follow
the rendered prompt ("A" after a chat template's newline, " A" after "Answer:"; `answer_token_ids`).

A language model favours a position whatever the texts, so `GenerativeHelpfulness` judges each pair both ways and
averages, pref(x, y) = (f(x, y) - f(y, x)) / 2, on the final summaries, with the pairings and transforms of
`PairwiseHelpfulness` (both are a `PairwiseReward`, see `r1engine.reward_models.scoring`).

Backends (`BACKENDS`): "hf" runs a transformers `AutoModelForCausalLM` itself, in batches of left-padded prompts sorted
by length within a token budget, keeping only the last position's logits. "vllm" asks a `vllm.LLM` for the prompt
log-probs of prompt + "A" and prompt + "B" (the exact log-probabilities of both letters, whatever their rank), from an
in-process engine of its own started as the rollout engine starts its (`r1engine.rollout.vllm_engine`), on a thread of
its own (vLLM's CPU kernels are bound to the thread that started them). A comparison longer than the judge's context has
its responses shortened, the longer one first, so that the question and the instruction stay whole.
"""

from __future__ import annotations

import contextlib
import os
import string
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from r1engine.models.tokenizer import uses_char_vocab
from r1engine.reward_models.inference import SerialThread
from r1engine.reward_models.scoring import PairwiseReward
from r1engine.reward_models.text import prompt_text

__all__ = [
    "BACKENDS",
    "DEFAULT_TEMPLATE",
    "PLAIN_ANSWER_CUE",
    "GenerativeHelpfulness",
    "GenerativeJudge",
    "answer_token_ids",
    "check_template",
]

BACKENDS = ("hf", "vllm")

DEFAULT_TEMPLATE = (
    "[Question]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is more helpful? Answer with A or B."
)
"""The judge's user turn: `{prompt}` the question (chat messages as `role: content` lines), `{a}` and `{b}` the
responses. Literal braces are written `{{` and `}}`."""
PLAIN_ANSWER_CUE = "\n\nAnswer:"
"""What follows the comparison for a tokenizer without a chat template, so that the next token is the answer."""
FIELDS = ("prompt", "a", "b")


def check_template(template: str) -> None:
    """Raise a ValueError unless `template` is a format string with exactly the fields {prompt}, {a} and {b}."""
    if not isinstance(template, str):
        raise ValueError(f"expected a format string with {{prompt}}, {{a}} and {{b}}, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # an unmatched brace
        raise ValueError(f"not a valid format string ({exc}; write literal braces as {{{{ and }}}})") from None
    unknown = sorted({f for f in fields if f not in FIELDS})
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(repr(f) for f in unknown)}: the fields are {{prompt}}, {{a}}, {{b}}"
        )
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise ValueError(f"missing field(s) {', '.join('{' + f + '}' for f in missing)}: the judge must see all three")


def answer_token_ids(tokenizer: Any, rendered: str, name: str = "judge") -> tuple[int, int]:
    """The ids of the answer tokens "A" and "B" after the prompt text `rendered`, as a writer would continue it: "A"
    after whitespace (a chat template's newline), " A" after anything else ("Answer:"), when that variant is one
    token that the tokenizer keeps apart from `rendered`; else the other variant; else the first that is a single
    token for both letters. A ValueError naming `name` when neither is."""

    def single(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    base = list(tokenizer.encode(rendered, add_special_tokens=False))
    candidates = []
    for space in ("", " ") if rendered[-1:].isspace() else (" ", ""):
        ids = (single(space + "A"), single(space + "B"))
        if None not in ids and ids[0] != ids[1]:
            candidates.append((space, ids))
    if not candidates:
        enc = {v: tokenizer.encode(v, add_special_tokens=False) for v in ("A", "B", " A", " B")}
        raise ValueError(
            f"{name}: the judge's verdict is read from one answer token, but its tokenizer encodes neither 'A'/'B' "
            f"nor ' A'/' B' as two distinct single tokens ({enc})"
        )
    for space, ids in candidates:
        follows = all(
            list(tokenizer.encode(rendered + space + letter, add_special_tokens=False)) == [*base, i]
            for letter, i in zip("AB", ids, strict=True)
        )
        if follows:
            return ids
    return candidates[0][1]


# ------------------------------------------------------------------------------------------------ backends
class HFBackend:
    """A transformers causal LM scoring the next token after each prompt (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        device: str | torch.device | None = None,
        offload: bool = False,
        token_budget: int = 16384,
        pad_id: int = 0,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget: must be >= 1, got {token_budget}")
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload = bool(offload) and self.device.type != "cpu"
        self.token_budget, self.pad_id = int(token_budget), int(pad_id)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = int(model.config.vocab_size)
        self.model.to("cpu" if self.offload else self.device)

    @contextlib.contextmanager
    def _awake(self) -> Iterator[Any]:
        if self.offload:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @torch.no_grad()
    def next_logprobs(self, seqs: Sequence[list[int]], tokens: Sequence[int]) -> torch.Tensor:
        """log P(token | seq) `[n, len(tokens)]` (float32, CPU)."""
        out = torch.empty(len(seqs), len(tokens), dtype=torch.float32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: each batch's width is its first
        batches: list[list[int]] = []
        for i in order:
            if batches and (len(batches[-1]) + 1) * len(seqs[batches[-1][0]]) <= self.token_budget:
                batches[-1].append(i)
            else:
                batches.append([i])
        index = torch.tensor(list(tokens), dtype=torch.long)
        with self._awake() as model:
            for rows in batches:
                width = len(seqs[rows[0]])
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):  # left padding: every prompt ends at the last position
                    ids[r, width - len(seqs[i]) :] = torch.tensor(seqs[i], dtype=torch.long)
                    mask[r, width - len(seqs[i]) :] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt's positions count from 0
                logits = model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device), logits_to_keep=1, use_cache=False,
                ).logits[:, -1].float()  # fmt: skip
                out[rows] = logits.log_softmax(-1)[:, index.to(logits.device)].cpu()
        return out


class VLLMBackend:
    """An in-process `vllm.LLM` giving the exact log-probability of each answer token after each prompt, as the
    prompt log-prob of that token appended (see the module docstring).

    The engine is started on a thread of its own and every call runs there: vLLM's CPU attention kernels check
    that the OpenMP thread count at a call is the one the engine was set up with, and that count is per thread (a
    judge started on the main thread and called from its scoring thread stops the process).
    """

    def __init__(
        self, path: str | os.PathLike, *, dtype: str = "float32", max_length: int | None = None, **llm_kwargs: Any
    ) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge-vllm")
        self.llm = self._thread.submit(self._start, path, dtype, max_length, llm_kwargs).result()
        config = self.llm.llm_engine.model_config
        self.max_length = int(config.max_model_len) - 1  # room for the appended letter
        self.vocab_size = int(config.get_vocab_size())

    @staticmethod
    def _start(path: str | os.PathLike, dtype: str, max_length: int | None, llm_kwargs: dict[str, Any]) -> Any:
        """The engine for the model directory `path`, set up as the rollout engine sets up its own (vLLM's log
        level, its known noise filtered, the engine core in this process)."""
        from r1engine.rollout.vllm_engine import _KnownNoise, set_vllm_log_level, torch_threads_kept

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        quiet = set_vllm_log_level(llm_kwargs.pop("log_level", "ERROR")) in ("ERROR", "CRITICAL")
        llm_kwargs.setdefault("use_tqdm_on_load", not quiet)
        llm_kwargs.setdefault("enforce_eager", True)
        llm_kwargs.setdefault("gpu_memory_utilization", 0.2)  # beside the policy: vLLM's default takes 90% of a GPU
        from vllm import LLM

        _KnownNoise.install()
        with torch_threads_kept():
            return LLM(
                model=str(path), skip_tokenizer_init=True, dtype=dtype,
                max_model_len=max_length + 1 if max_length is not None else None, **llm_kwargs,
            )  # fmt: skip

    def next_logprobs(self, seqs: Sequence[list[int]], tokens: Sequence[int]) -> torch.Tensor:
        """log P(token | seq) `[n, len(tokens)]` (float32, CPU), computed on the engine's thread."""
        if not seqs:
            return torch.empty(0, len(tokens))
        return self._thread.submit(self._next_logprobs, seqs, tokens).result()

    def _next_logprobs(self, seqs: Sequence[list[int]], tokens: Sequence[int]) -> torch.Tensor:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # max_tokens=1: vLLM generates at least one token; prompt_logprobs=0: only each prompt token's own log-prob
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        requests = [TokensPrompt(prompt_token_ids=[*s, t]) for s in seqs for t in tokens]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        values = [o.prompt_logprobs[-1][t].logprob for o, t in zip(outputs, [*tokens] * len(seqs), strict=True)]
        return torch.tensor(values, dtype=torch.float32).reshape(len(seqs), len(tokens))


# ------------------------------------------------------------------------------------------------ the judge
class GenerativeJudge(SerialThread):
    """A causal LM as a pairwise judge: `judge(prompts, firsts, seconds)` -> f `[n]` (a `Judge`; no swap; see the
    module docstring).

    `backend`: an `HFBackend` or `VLLMBackend`. `tokenizer`: the model's. `template`: the comparison with {prompt},
    {a}, {b} (`DEFAULT_TEMPLATE`). `chat`: render through the tokenizer's chat template (None: when it has one).
    `max_length`: tokens of a comparison (None: the model's context). `name`: for messages and the thread's name.
    """

    thread_prefix = "judge"

    def __init__(
        self,
        backend: HFBackend | VLLMBackend,
        tokenizer: Any,
        *,
        template: str = DEFAULT_TEMPLATE,
        chat: bool | None = None,
        max_length: int | None = None,
        name: str = "judge",
    ) -> None:
        try:
            check_template(template)
        except ValueError as exc:
            raise ValueError(f"{name}: template: {exc}") from None
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_chat:
            raise ValueError(f"{name}: chat=True needs a tokenizer with a chat template; this one has none")
        if len(tokenizer) > backend.vocab_size:
            raise ValueError(
                f"{name}: the tokenizer has {len(tokenizer)} tokens but the judge model's vocab_size is "
                f"{backend.vocab_size} (is it this model's tokenizer?)"
            )
        self.backend, self.tokenizer, self.template, self.name = backend, tokenizer, template, name
        self.chat = has_chat if chat is None else bool(chat)
        self.max_length = min(int(max_length), backend.max_length) if max_length is not None else backend.max_length
        self._bos = [tokenizer.bos_token_id] if uses_char_vocab(tokenizer) else []
        self.answer_ids = answer_token_ids(tokenizer, self._text("Q", "x", "y"), name)
        """The token ids of "A" and "B" whose log-probs the verdict compares."""
        self.truncated = 0
        """Comparisons shortened to `max_length` so far."""
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        backend: str = "hf",
        tokenizer: str | os.PathLike | None = None,
        dtype: str = "float32",
        device: str | torch.device | None = None,
        offload: bool = False,
        token_budget: int = 16384,
        key: str = "path",
        **options: Any,
    ) -> GenerativeJudge:
        """The causal LM in the directory `path` with its tokenizer (or `tokenizer`'s) on `backend`; `device`,
        `offload`, `token_budget` are the hf backend's; `options` go to the constructor (`template`, `chat`,
        `max_length`, `name`). Errors name `key`."""
        from r1engine.models.checkpoint import resolve_model_dir
        from r1engine.models.tokenizer import load_tokenizer

        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
        root = resolve_model_dir(path, key=key)
        tok_key = f"{key}.tokenizer" if tokenizer is not None else key
        tok = load_tokenizer(tokenizer if tokenizer is not None else root, key=tok_key)
        options.setdefault("name", key)
        if backend == "vllm":
            if device is not None or offload:
                raise ValueError(f"{key}: the vllm backend runs where vLLM puts it (no device or offload)")
            engine: HFBackend | VLLMBackend = VLLMBackend(root, dtype=dtype, max_length=options.get("max_length"))
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(root), dtype=getattr(torch, dtype))
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            engine = HFBackend(model, device=device, offload=offload, token_budget=token_budget, pad_id=pad or 0)
        return cls(engine, tok, **options)

    # -------------------------------------------------------------------------------------------- inputs
    def _text(self, prompt: Any, a: str, b: str) -> str:
        text = self.template.format(prompt=prompt_text(prompt), a=a, b=b)
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text + PLAIN_ANSWER_CUE

    def _ids(self, prompt: Any, a: str, b: str) -> list[int]:
        text = self._text(prompt, a, b)
        if self.chat:  # the template writes its own special tokens
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._bos + list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode(self, prompt: Any, a: str, b: str) -> list[int]:
        """The comparison of `a` (shown first) and `b` as token ids, within `max_length`: the responses are cut,
        the longer first, so that the question and the instruction stay whole (only a question too long by itself
        loses its beginning)."""
        ids = self._ids(prompt, a, b)
        if len(ids) <= self.max_length:
            return ids
        self.truncated += 1
        ta, tb = (self.tokenizer.encode(x, add_special_tokens=False) for x in (a, b))
        keep = len(ta) + len(tb) - (len(ids) - self.max_length)
        for _ in range(4):  # decoding and encoding again may merge tokens differently: retry with the excess
            ka, kb = _split(len(ta), len(tb), max(keep, 0))
            ids = self._ids(prompt, self.tokenizer.decode(ta[:ka]), self.tokenizer.decode(tb[:kb]))
            if len(ids) <= self.max_length or keep <= 0:
                break
            keep -= len(ids) - self.max_length
        return ids[-self.max_length :]

    # -------------------------------------------------------------------------------------------- verdicts
    def __call__(self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """f = log P("A") - log P("B") `[n]` (float32, CPU) for `firsts[i]` shown as response A."""
        sizes = {"prompts": len(prompts), "firsts": len(firsts), "seconds": len(seconds)}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"{self.name}: expected one entry per row in each of prompts, firsts, seconds, got {sizes}"
            )
        seqs = [self.encode(p, a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        with self._lock:
            logprobs = self.backend.next_logprobs(seqs, self.answer_ids)
        return logprobs[:, 0] - logprobs[:, 1]


def _split(la: int, lb: int, keep: int) -> tuple[int, int]:
    """Token counts kept of two responses of `la` and `lb` tokens, `keep` in all: the longer is cut first, down to
    the shorter's length, then both evenly."""
    if la + lb <= keep:
        return la, lb
    short = min(la, lb, keep // 2)
    long_ = keep - short
    return (long_, short) if la >= lb else (short, long_)


class GenerativeHelpfulness(PairwiseReward):
    """Helpfulness rewards from a `GenerativeJudge`: swap-averaged verdicts on the final summaries, with the pairings
    and transforms of `PairwiseHelpfulness` (see `PairwiseReward`), computed on the judge's thread by `submit`."""

    def __init__(
        self,
        judge: GenerativeJudge,
        *,
        pairing: str = "round_robin",
        transform: str = "prob",
        summary_only: bool = True,
    ) -> None:
        if not isinstance(judge, GenerativeJudge):
            raise TypeError(f"judge: expected a GenerativeJudge, got {type(judge).__name__}")
        super().__init__(judge, pairing=pairing, transform=transform, summary_only=summary_only)

    def judge(self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> torch.Tensor:
        """The judge's verdicts `[n]` (no swap)."""
        return self.scorer(prompts, firsts, seconds)
