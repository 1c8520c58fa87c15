"""The typed config: defaults from the paper, YAML + dotted overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from r1engine.trainer.config import Config, ConfigError, load_config


def test_defaults_follow_the_paper():
    cfg = load_config()
    g = cfg.grpo
    assert (g.lr, g.beta, g.group_size, g.prompts_per_step, g.ref_reset_every, g.temperature) == (
        3e-6,
        0.001,
        16,
        32,
        400,
        1.0,
    )
    assert cfg.rewards.weights == {"arithmetic": 1.0, "format": 1.0}  # the default task's accuracy reward + format


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  steps: 7\n  lr: 1.0e-4\nrewards:\n  weights: {arithmetic: 1.0, format: 0.5}\n")
    cfg = load_config(path, ["grpo.steps=9", "grpo.eps_high=0.28", "rewards.weights.format=1.0", "seed=3"])
    assert isinstance(cfg, Config)
    assert cfg.grpo.steps == 9 and cfg.grpo.lr == 1e-4 and cfg.grpo.eps_high == 0.28 and cfg.seed == 3
    assert cfg.rewards.weights == {"arithmetic": 1.0, "format": 1.0}
    assert isinstance(load_config(path, ["grpo.lr=1"]).grpo.lr, float)  # int -> float is lossless


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.stepz=3", "grpo.stepz: unknown key"),
        ("modle.preset=demo", "modle: unknown key"),
        ("grpo.steps=abc", "grpo.steps: expected an integer"),
        ("grpo.steps=1.5", "grpo.steps: expected an integer"),
        ("grpo.lr=fast", "grpo.lr: expected a number"),
        ("grpo.agg=mean", "grpo.agg: must be one of"),
        ("rollout.backend=sglang", "rollout.backend: must be one of"),
        ("grpo.mini_batches=7", "grpo.mini_batches: the rollout batch of 512"),
        ("grpo.group_size=1", "grpo.group_size"),
        ("grpo.temperature=0", "grpo.temperature: must be > 0"),
        ("grpo.dual_clip=0.5", "grpo.dual_clip: must be > 1"),
        ("training.deepspeed_zero_stage=4", "training.deepspeed_zero_stage"),
        ("training.offload_optimizer=true", "training.offload_optimizer: needs"),
        ("rewards.weights={}", "rewards.weights"),
        ("rewards.weights.acuracy=1.0", "rewards.weights.acuracy: unknown reward"),
        ("grpo.steps", "expected dotted.key=value"),
        ("training.device=gpu0", "training.device: not a device name"),
        # accepted before, then crashed later or misbehaved silently (issue 17, item 9)
        ("rewards.timeout_s=0", "rewards.timeout_s: must be a finite value > 0"),
        ("checkpoint.keep=0", "checkpoint.keep: must be >= 1"),
        ("seed=-1", "seed: must be >= 0"),
        ("training.num_threads=-4", "training.num_threads: must be >= 0"),
        ("eval.temperature=-1", "eval.temperature: must be a finite value > 0"),
        ("rollout.top_k=0", "rollout.top_k: must be -1"),
        ("rollout.vllm_log_level=LOUD", "rollout.vllm_log_level: must be one of"),
        ("rollout.top_p=0", "rollout.top_p: must be in (0, 1]"),
        ("eval.top_p=1.5", "eval.top_p: must be in (0, 1]"),
        ("grpo.lr=.nan", "grpo.lr: must be a finite value > 0"),
        ("sft.lr=.inf", "sft.lr: must be a finite value > 0"),
        ("grpo.max_grad_norm=-1", "grpo.max_grad_norm: must be a finite value > 0"),
        ("grpo.beta=.nan", "grpo.beta: must be >= 0"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_rollout_device_is_for_the_native_engine():
    assert load_config(None, ["rollout.device=cpu", "rollout.backend=native"]).rollout.device == "cpu"
    with pytest.raises(ConfigError, match=r"rollout\.device: applies to the native engine"):
        load_config(None, ["rollout.device=cpu", "rollout.backend=vllm"])


def test_a_rollout_worker_generates_on_the_training_gpu_unless_told_otherwise():
    import torch

    from r1engine.trainer.grpo import worker_device

    def rollout(*overrides: str):
        return load_config(None, list(overrides)).rollout

    gpu = torch.device("cuda:0")  # a device name, no GPU needed
    assert worker_device(rollout("rollout.backend=native"), gpu) == "cuda:0"
    assert worker_device(rollout("rollout.backend=auto"), gpu) == "cuda:0"  # create_engine drops it if vLLM
    assert worker_device(rollout("rollout.backend=vllm"), gpu) is None  # vLLM places itself
    assert worker_device(rollout("rollout.backend=native", "rollout.device=cuda:1"), gpu) == "cuda:1"
    assert worker_device(rollout("rollout.backend=native"), torch.device("cpu")) is None


def test_sampler_old_logprobs_take_any_temperature_but_no_top_p_or_top_k():
    assert load_config(None, ["grpo.old_logprobs=sampler", "grpo.temperature=0.7"]).grpo.temperature == 0.7
    with pytest.raises(ConfigError, match=r"^rollout\.top_p: grpo\.old_logprobs=sampler needs 1\.0 .* got 0\.9$"):
        load_config(None, ["grpo.old_logprobs=sampler", "rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match=r"^rollout\.top_k: grpo\.old_logprobs=sampler needs -1 .* got 20$"):
        load_config(None, ["grpo.old_logprobs=sampler", "rollout.top_k=20"])
    assert load_config(None, ["rollout.top_p=0.9"]).rollout.top_p == 0.9  # recomputed old log-probs: any filter


def test_kl_without_a_reference_is_rejected():
    with pytest.raises(ConfigError, match="grpo.beta: a KL coefficient needs a reference"):
        load_config(None, ["grpo.beta=0.01", "grpo.ref_reset_every=0", "sft.steps=0"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load(monkeypatch):
    root = Path(__file__).parent.parent
    monkeypatch.chdir(root)  # model paths in the configs are relative to the repository root
    for path in sorted((root / "configs").glob("*.yaml")):
        if path.name == "smollm2.yaml" and not (root / "models" / "SmolLM2-135M-Instruct").is_dir():
            with pytest.raises(ConfigError, match="model.path: 'models/SmolLM2-135M-Instruct' does not exist"):
                load_config(path)  # the real-model example before scripts/fetch_smollm2.sh
            continue
        load_config(path)


def test_cli_takes_overrides_before_and_after_flags(capsys):
    from r1engine.cli import main

    demo = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    assert main(["config", "grpo.steps=3", "--config", demo, "seed=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["grpo"]["steps"] == 3 and shown["seed"] == 4 and shown["output_dir"] == "runs/demo"
    with pytest.raises(SystemExit):
        main(["config", "--config", demo, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_broken_yaml_is_one_line_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  steps: 3\n  lr: {a: 1\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml': not valid YAML: .* at line \d+, column \d+") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"grpo\.lr: the value '\[1,' is not valid YAML"):
        load_config(None, ["grpo.lr=[1,"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- grpo\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top, got list"):
        load_config(listed)
