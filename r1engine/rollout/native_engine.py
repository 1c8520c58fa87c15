"""`NativeEngine`: batched generation in pure PyTorch with a preallocated KV cache and exact MTP self-speculation.

Used when vLLM is not installed, as the reference the vLLM backend is checked against, and on a GPU as is.
One decode step without speculation runs the main model on one token per row. With k speculative tokens a step
runs the main model on [last, d_1..d_k] (k+1 positions), applies the exact acceptance rule
(`r1engine.rollout.speculative`), then runs the MTP layer on the accepted positions (its own KV cache) to draft the
next d_1, and chains it k-1 more times for d_2..d_k (as vLLM reuses one MTP layer).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from r1engine.models.decode_step import FusedDecodeStep
from r1engine.models.kv_cache import KVCache
from r1engine.models.policy import PolicyModel
from r1engine.rollout.base import RolloutBatch, RolloutStats, check_same_config, token_versions, validate_prompts
from r1engine.rollout.sampling import SamplingConfig, processed_probs, sample_from
from r1engine.rollout.speculative import verify_drafts


class NativeEngine:
    """Pure-PyTorch rollout engine holding its own copy of the policy's weights (like an inference server)."""

    backend = "native"

    def __init__(
        self,
        model: PolicyModel,
        *,
        num_speculative_tokens: int = 0,
        max_model_len: int | None = None,
        draft_sampling: str = "greedy",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tokenizer=None,
    ) -> None:
        if not isinstance(model, PolicyModel):
            raise TypeError(f"model must be a PolicyModel, got {type(model).__name__}")
        cfg = model.config
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        if num_speculative_tokens > 0 and cfg.num_mtp_layers == 0:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens} needs MTP layers, but the model has "
                "num_mtp_layers=0 (use num_speculative_tokens=0 or a model with num_mtp_layers >= 1)"
            )
        if draft_sampling not in ("greedy", "sample"):
            raise ValueError(f"draft_sampling must be 'greedy' or 'sample', got {draft_sampling!r}")
        if tokenizer is not None:
            from r1engine.models.tokenizer import check_vocab_fits

            check_vocab_fits(tokenizer, cfg.vocab_size)
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        self.num_speculative_tokens = int(num_speculative_tokens)
        self.draft_sampling = draft_sampling
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype or model.dtype
        self.model = model.frozen_copy(device=self.device, dtype=self.dtype)
        self._home_device = self.device
        self.last_stats: RolloutStats | None = None
        self.version = 0

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------------------------------- weights / memory
    @torch.no_grad()
    def sync_weights(self, model: PolicyModel) -> None:
        """Copy the trainer's weights (main model and MTP layers) into the engine's copy, in place; version + 1."""
        check_same_config("sync_weights", model.config.replace(), self.model.config)
        self.load_named_weights(model.named_weights())
        self.version += 1

    @torch.no_grad()
    def load_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (checkpoint name, tensor) pairs (`PolicyModel.named_weights` names) into the engine's weights in
        place, casting to its dtype and device; names not given keep their values. Returns the number loaded.
        Shared by `sync_weights` and the out-of-process worker (`r1engine.rollout.remote`)."""
        own = dict(self.model.named_weights())
        count = 0
        for name, t in weights:
            dst = own.get(name)
            if dst is None:
                raise ValueError(f"load_named_weights: {name!r} is not a weight of the engine's policy")
            if dst.shape != t.shape:
                raise ValueError(
                    f"load_named_weights: {name!r} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(t.detach())
            count += 1
        return count

    def offload(self) -> None:
        """Move the weights to CPU (frees device memory between stages); a no-op when already on CPU."""
        self.model.to("cpu")

    def onload(self) -> None:
        """Move the weights back to the engine's device."""
        self.model.to(self._home_device)

    # ------------------------------------------------------------------------------------------- generation
    @staticmethod
    def _logprob(logits: torch.Tensor, probs: torch.Tensor, tok: torch.Tensor, scfg: SamplingConfig) -> torch.Tensor:
        """The sampled tokens' log-probs under the distribution `probs` they were drawn from (temperature, top-k,
        top-p applied: vLLM's "processed_logprobs"); greedy: log softmax(raw logits), as vLLM reports it."""
        if scfg.greedy:
            return torch.log_softmax(logits.float(), -1).gather(-1, tok[..., None]).squeeze(-1)
        return probs.gather(-1, tok[..., None]).squeeze(-1).log()

    def _draft(self, h: torch.Tensor, scfg: SamplingConfig, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.model.logits(h).float()
        if self.draft_sampling == "greedy" or scfg.greedy:
            return logits.argmax(-1), None
        q = processed_probs(logits, scfg)
        return sample_from(q, gen), q

    @torch.no_grad()
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
        num_speculative_tokens: int | None = None,
    ) -> RolloutBatch:
        """Sample `n` completions per prompt; see `RolloutBatch`. `num_speculative_tokens` overrides the engine's."""
        cfg = self.model.config
        k = self.num_speculative_tokens if num_speculative_tokens is None else int(num_speculative_tokens)
        if k > 0 and cfg.num_mtp_layers == 0:
            raise ValueError(f"num_speculative_tokens={k} needs MTP layers, but the model has num_mtp_layers=0")
        prompts = validate_prompts(
            prompt_ids, vocab_size=cfg.vocab_size, max_model_len=self.max_model_len, n=n, max_new_tokens=max_new_tokens
        )
        scfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
        stops = set(int(s) for s in (stop_token_ids or []))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        t0 = time.perf_counter()

        rows = [p for p in prompts for _ in range(n)]
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
        row_prompt = prompt_index.to(self.device)
        bsz = len(rows)
        prompt_lens = torch.tensor([len(p) for p in prompts], device=self.device)
        lens = prompt_lens[row_prompt]
        budget = [min(max_new_tokens, self.max_model_len - len(r)) for r in rows]
        prompt_ids = torch.zeros((len(prompts), int(prompt_lens.max())), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            prompt_ids[i, : len(p)] = torch.tensor(p, device=self.device)
        # room for the longest row this call can produce (not max_model_len: the cache is zero-filled per call). With
        # speculation a row's final step can commit up to k accepted tokens past its budget, and a finished row stays
        # in the batch, so later verify forwards write k+1 more slots after those: 2k + 1 beyond the budget.
        cap = max(len(r) + b for r, b in zip(rows, budget, strict=True)) + 2 * k + 1
        kv = dict(dtype=self.dtype, device=self.device)
        cache = KVCache(cfg.num_layers, len(prompts), cap, cfg.num_kv_heads, cfg.head_dim, **kv)
        mcache = KVCache(1, bsz, cap, cfg.num_kv_heads, cfg.head_dim, **kv) if k else None
        brange = torch.arange(bsz, device=self.device)
        max_pos = cfg.max_position_embeddings - 1

        out_ids: list[list[int]] = [[] for _ in range(bsz)]
        out_lp: list[list[float]] = [[] for _ in range(bsz)]
        finish = ["length"] * bsz
        active = torch.ones(bsz, dtype=torch.bool, device=self.device)
        stats = RolloutStats(backend=self.backend, num_completions=bsz, num_speculative_tokens=k)

        def emit(row: int, toks: list[int], lps: list[float]) -> None:
            for t, lp in zip(toks, lps, strict=True):
                out_ids[row].append(t)
                out_lp[row].append(lp)
                if t in stops:
                    finish[row] = "stop"
                    active[row] = False
                    return
                if len(out_ids[row]) >= budget[row]:
                    active[row] = False
                    return

        # prefill each prompt once (right-padded; the ragged cache masks each row's padding away), then give each of
        # its n samples a copy of its cache rows: n times less prefill work, as vLLM's prefix cache does for the
        # shared prompt of a GRPO group
        out = self.model(prompt_ids, kv_cache=cache)
        cache.advance(prompt_lens)
        if n > 1:
            cache.keep_rows(row_prompt)
        last_pos = lens - 1
        logits = self.model.logits(out.hidden[torch.arange(len(prompts), device=self.device), prompt_lens - 1])
        logits = logits[row_prompt]
        probs = processed_probs(logits, scfg)
        tok = sample_from(probs, gen)
        lp = self._logprob(logits, probs, tok, scfg)
        for i in range(bsz):
            emit(i, [int(tok[i])], [float(lp[i])])
        last = tok
        drafts = dprobs = None
        if k:
            ids = prompt_ids[row_prompt]
            nxt = torch.zeros_like(ids)
            nxt[:, :-1] = ids[:, 1:]
            nxt[brange, last_pos] = tok
            mh = self.model.mtp_hidden(out.last_hidden[row_prompt], nxt, kv_cache=mcache)
            mcache.advance(lens)
            drafts, dprobs = self._chain_drafts(mh[brange, last_pos], mcache, k, scfg, gen)

        live = torch.arange(bsz, device=self.device)  # without speculation: the batch row of each cache row
        fused_step = None if k else FusedDecodeStep.build(self.model, cache)  # one C++ call per step where it applies
        while bool(active.any()):
            stats.num_steps += 1
            if not k:
                live_active = active[live]
                if int(live_active.sum()) <= 3 * len(live) // 4:  # drop finished rows (copies the cache)
                    keep = live_active.nonzero().squeeze(1)
                    cache.keep_rows(keep)
                    live, last, live_active = live[keep], last[keep], live_active[keep]
                if fused_step is not None:
                    logits = fused_step(last, cache)
                else:
                    pos = cache.lengths[:, None].clamp(max=max_pos)
                    logits = self.model.logits(self.model(last[:, None], position_ids=pos, kv_cache=cache).hidden[:, 0])
                cache.advance(live_active.long())
                probs = processed_probs(logits, scfg)
                tok = sample_from(probs, gen)
                lp = self._logprob(logits, probs, tok, scfg)
                for i, on, t, p in zip(live.tolist(), live_active.tolist(), tok.tolist(), lp.tolist(), strict=True):
                    if on:
                        emit(i, [t], [p])
                last = tok
                continue
            inp = torch.cat([last[:, None], drafts], 1)  # [B, k+1]
            pos = (cache.lengths[:, None] + torch.arange(k + 1, device=self.device)).clamp(max=max_pos)
            out = self.model(inp, position_ids=pos, kv_cache=cache)
            logits = self.model.logits(out.hidden)  # [B, k+1, V]
            probs = processed_probs(logits, scfg)
            res = verify_drafts(drafts, dprobs, probs, gen)
            a, y = res.num_accepted, res.next_token
            emitted = drafts.clone()
            emitted = torch.cat([emitted, torch.zeros_like(y)[:, None]], 1)
            emitted[brange, a] = y
            lps = self._logprob(logits, probs, emitted, scfg)  # [B, k+1]
            was_active = active.clone()
            act_idx = torch.nonzero(was_active).flatten().tolist()
            a_list = a.tolist()
            for i in act_idx:
                m = a_list[i] + 1
                emit(i, emitted[i, :m].tolist(), lps[i, :m].tolist())
            stats.num_drafted += k * len(act_idx)
            stats.num_accepted += int(a[was_active].sum())
            step = (a + 1) * was_active.long()
            cache.advance(step)
            if not bool(active.any()):
                break
            mpos = (mcache.lengths[:, None] + torch.arange(k + 1, device=self.device)).clamp(max=max_pos)
            mh = self.model.mtp_hidden(out.last_hidden, emitted, position_ids=mpos, kv_cache=mcache)
            mcache.advance(step)
            last = y
            drafts, dprobs = self._chain_drafts(mh[brange, a], mcache, k, scfg, gen)

        stats.elapsed_s = time.perf_counter() - t0
        stats.num_tokens = sum(len(c) for c in out_ids)
        self.last_stats = stats
        return RolloutBatch(
            prompt_index=prompt_index,
            completion_ids=out_ids,
            logprobs=[torch.tensor(x, dtype=torch.float32) for x in out_lp],
            finish_reason=finish,
            stats=stats,
            prompt_ids=rows,
            versions=token_versions(out_ids, self.version),
        )

    def _chain_drafts(self, h0: torch.Tensor, mcache: KVCache, k: int, scfg: SamplingConfig, gen):
        """d_1 from the MTP output h0 `[B, H]`; d_2..d_k by feeding (MTP output, previous draft) back in."""
        d, q = self._draft(h0, scfg, gen)
        drafts, qs = [d], [q]
        h = h0
        max_pos = self.model.config.max_position_embeddings - 1
        for _ in range(1, k):
            pos = mcache.lengths[:, None].clamp(max=max_pos)
            h = self.model.mtp_hidden(h[:, None], drafts[-1][:, None], position_ids=pos, kv_cache=mcache)[:, 0]
            mcache.advance(1)  # provisional: undone below, the real pairs overwrite these slots
            d, q = self._draft(h, scfg, gen)
            drafts.append(d)
            qs.append(q)
        if k > 1:
            mcache.advance(-(k - 1))
        dprobs = None if qs[0] is None else torch.stack(qs, 1)
        return torch.stack(drafts, 1), dprobs
