"""GRPO math in plain PyTorch (advantages, KL estimators, surrogate, aggregation): the oracle for fast paths."""
