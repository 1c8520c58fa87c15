"""r1engine: a custom-kernel performance engine for DeepSeek-R1-style GRPO training.

Submodules are imported on demand so that `import r1engine` stays cheap and never needs a GPU,
the compiled extension, vLLM or DeepSpeed:

    r1engine.ops        fused operators with a backend switch (torch reference, C++, Triton, CUDA)
    r1engine.algo       GRPO math in plain PyTorch (advantages, KL estimators, surrogate, aggregation)
    r1engine.packing    best-fit sequence packing planner, collate/uncollate, packed attention
    r1engine.pipeline   DualPipe-style schedules, simulator and torch.distributed executor
    r1engine.rewards    rule-based rewards, code sandbox, asynchronous reward scheduler
    r1engine.models     policy model with MTP layers, tiny configs, local tokenizer
    r1engine.rollout    vLLM and native rollout engines with MTP speculative decoding
    r1engine.trainer    the GRPO training loop (thin glue over the pieces above)
"""

__version__ = "0.1.0"
