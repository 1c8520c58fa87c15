# The two commands of the README's quick start. Both set up .venv on first use.
.PHONY: train test setup bench

train: setup
	.venv/bin/r1engine train --config configs/demo.yaml

test:
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

bench: setup
	.venv/bin/python benchmarks/bench_grpo_loss_cpu.py
