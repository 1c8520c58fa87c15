"""DeepSpeed ZeRO (stages 1-3, optimizer offload) across 2 real CPU processes (gloo) agrees with one process
training on the whole batch.

Each rank trains on half of a fixed batch of sequences with `grpo_train_step`; DeepSpeed averages the
gradients, which for the per-sequence mean aggregation equals the single-process gradient of the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3


def _batch():
    from r1engine.models import PolicyConfig, PolicyModel
    from r1engine.trainer.sequences import build_sequences, loss_tokens, pack, packed_logprobs

    torch.manual_seed(0)
    model = PolicyModel(PolicyConfig.tiny(vocab_size=64, hidden_size=64, intermediate_size=128))
    model.reset_parameters(seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 64, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(8)]  # fmt: skip
    completions = [torch.randint(4, 64, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(8)]  # fmt: skip
    seqs = build_sequences(prompts, completions)
    batch, _ = pack(seqs, 32)
    tokens = loss_tokens(batch)
    from r1engine.trainer.sequences import per_sequence

    old = per_sequence(batch, tokens, packed_logprobs(model, batch, tokens, 1.0) - 0.05, len(seqs))
    advantages = torch.randn(8, generator=gen)
    return model, seqs, old, advantages


def _train(model, engine, seqs, old, advantages, index):
    from r1engine.trainer.config import GRPOConfig
    from r1engine.trainer.grpo import grpo_train_step

    cfg = GRPOConfig(mtp_loss_coef=0.1, max_new_tokens=16)
    losses = []
    for _ in range(STEPS):
        stats = grpo_train_step(
            model, engine, seqs.subset(index), old=[old[i] for i in index], ref=None,
            advantages=advantages[torch.tensor(index)], cfg=cfg, chunk_len=32,
        )  # fmt: skip
        losses.append(stats["loss/policy"] + stats["loss/mtp"])
    return losses


def _rank_main(rank: int, port: int, out: str, zero_stage: int, offload: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    from r1engine.trainer.engine import TrainEngine

    deepspeed.init_distributed(dist_backend="gloo")
    model, seqs, old, advantages = _batch()
    engine = TrainEngine(model, lr=1e-3, max_grad_norm=1.0, zero_stage=zero_stage, offload_optimizer=offload)
    losses = _train(model, engine, seqs, old, advantages, list(range(rank, 8, WORLD)))
    with engine.full_weights():  # ZeRO-3 holds only this rank's partition outside this context
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"losses": losses, "weights": weights}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("zero_stage", "offload"),
    [(1, False), (2, False), (2, True), (3, False)],
    ids=["zero1", "zero2", "zero2-offload", "zero3"],
)
def test_zero_two_processes_match_single_process(tmp_path, zero_stage, offload):
    pytest.importorskip("deepspeed")
    from r1engine.trainer.engine import TrainEngine

    mp.start_processes(
        _rank_main,
        args=(_free_port(), str(tmp_path), zero_stage, offload),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    model, seqs, old, advantages = _batch()
    engine = TrainEngine(model, lr=1e-3, max_grad_norm=1.0, zero_stage=0)
    single = _train(model, engine, seqs, old, advantages, list(range(8)))

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for step in range(STEPS):
        mean_rank_loss = sum(r["losses"][step] for r in ranks) / WORLD
        assert mean_rank_loss == pytest.approx(single[step], rel=1e-4, abs=1e-6), f"step {step}"
    # Weights: each parameter's distance from the single-process result, relative to how far training moved it.
    # (Elementwise tolerances do not fit ZeRO-3: its reduce-scatter sums in another order, and Adam turns that
    # rounding noise in near-zero gradient entries into update-sized differences for single elements.)
    initial = _batch()[0].state_dict()
    for name, tensor in model.state_dict().items():
        update = (tensor - initial[name]).norm()
        assert update > 0, f"{name} did not move"
        for r in ranks:
            err = (r["weights"][name] - tensor).norm() / update
            assert err < 1e-3, f"{name}: distance to the single-process weights is {err:.2e} of the update"
