"""Toy task and oracles for tests and benchmarks of the policy and the rollout engines.

`pattern_batch`: arithmetic progressions over a band of character ids (start and step drawn per sequence), a
language a tiny model learns in a few hundred steps, so its MTP head can predict the token after next and
speculation has something to accept. `fit_pattern`: a few optimizer steps of next-token (+ MTP) loss.
`exact_completion_distribution`: the exact probability of every short completion under the processed sampling
distribution (the oracle of the speculation-exactness tests). `chi_square_pvalue`: goodness of fit without scipy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from r1engine.models.policy import PolicyModel
from r1engine.rollout.sampling import SamplingConfig, processed_probs

BAND_LO, BAND = 10, 80


def pattern_batch(batch: int, length: int, generator: torch.Generator, steps: tuple[int, ...] = (1, 2, 3)):
    """`[batch, length]` ids: id_i = BAND_LO + (s0 + i*d) mod BAND, s0 uniform, d drawn from `steps`."""
    s0 = torch.randint(0, BAND, (batch, 1), generator=generator)
    d = torch.tensor(steps)[torch.randint(0, len(steps), (batch, 1), generator=generator)]
    return BAND_LO + (s0 + torch.arange(length)[None] * d) % BAND


def fit_pattern(
    model: PolicyModel,
    steps: int,
    *,
    lr: float = 3e-3,
    batch: int = 32,
    length: int = 20,
    mtp_lam: float = 1.0,
    seed: int = 0,
    pattern_steps: tuple[int, ...] = (1, 2, 3),
) -> list[float]:
    """Train `model` in place on `pattern_batch` with next-token CE (+ `mtp_lam` * MTP loss, joint); returns losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        ids = pattern_batch(batch, length, gen, pattern_steps)
        out = model(ids)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
        if mtp_lam and model.config.num_mtp_layers:
            loss = loss + model.mtp_loss(ids, out.last_hidden, lam=mtp_lam, detach_main=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def exact_completion_distribution(
    model: PolicyModel, prompt: list[int], depth: int, cfg: SamplingConfig, min_prob: float = 0.0
) -> dict[tuple[int, ...], float]:
    """P(completion) for every completion of `depth` tokens with nonzero probability under `cfg` (exact, by
    enumeration: keep it to top_k-restricted, shallow trees). Branches below `min_prob` are dropped."""
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(depth):
        seqs = list(frontier)
        ids = torch.tensor([prompt + list(s) for s in seqs], device=model.device)
        probs = processed_probs(model(ids).logits[:, -1], cfg).cpu().double()
        nxt: dict[tuple[int, ...], float] = {}
        for s, row in zip(seqs, probs, strict=True):
            for tok in torch.nonzero(row > 0).flatten().tolist():
                pr = frontier[s] * float(row[tok])
                if pr > min_prob:
                    nxt[s + (tok,)] = pr
        frontier = nxt
    return frontier


def chi_square_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Pearson chi-square of observed `counts` against `probs` (cells with expected < min_expected pooled into one;
    any observed cell outside `probs` counts there too). Returns (statistic, p-value, degrees of freedom); the
    p-value uses the Wilson-Hilferty normal approximation (good for df >= 3)."""
    n = sum(counts.values())
    big = [c for c, p in probs.items() if p * n >= min_expected]
    pooled_p = 1.0 - sum(probs[c] for c in big)
    pooled_o = n - sum(counts.get(c, 0) for c in big)
    obs = [counts.get(c, 0) for c in big] + [pooled_o]
    exp = [probs[c] * n for c in big] + [pooled_p * n]
    stat = 0.0
    for o, e in zip(obs, exp, strict=True):
        if e > 0:
            stat += (o - e) ** 2 / e
        elif o > 0:
            stat = math.inf
    df = max(len(big) - (0 if pooled_p * n > 0 else 1), 1)
    if math.isinf(stat):
        return stat, 0.0, df
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return stat, 0.5 * math.erfc(z / math.sqrt(2)), df


def count_completions(completions: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    """Histogram of the first `depth` tokens of each completion."""
    out: dict[tuple[int, ...], int] = {}
    for c in completions:
        key = tuple(c[:depth])
        out[key] = out.get(key, 0) + 1
    return out


__all__ = [
    "chi_square_pvalue",
    "count_completions",
    "exact_completion_distribution",
    "fit_pattern",
    "pattern_batch",
]
