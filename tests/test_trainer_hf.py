"""GRPO on Hugging Face checkpoints made by transformers (Llama, Qwen2, Qwen3 with BPE tokenizers): `r1engine train
model.path=...` runs, checkpoints keep the tokenizer byte for byte and the source's ids, `r1engine export` loads in
transformers with equal logits, the trainer takes a model and tokenizer from the caller, the MTP warm-up trains the
MTP layers alone, and bad input fails before any heavy work with one line naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1engine.models import PolicyModel
from r1engine.models.tiny_hf import make_tiny_hf_model
from r1engine.models.tokenizer import load_tokenizer
from r1engine.trainer.config import ConfigError, load_config
from r1engine.trainer.grpo import GRPOTrainer
from r1engine.trainer.metrics import read_metrics

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
SMALL = [
    "task.max_digits=2",
    "task.num_eval=4",
    "sft.steps=2",
    "sft.batch_size=4",
    "grpo.steps=1",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "grpo.mini_batches=1",
    "grpo.max_new_tokens=8",
    "training.chunk_len=64",
    "training.num_threads=1",
    "eval.samples=1",
    "rollout.backend=native",
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: make_tiny_hf_model(family, root / family, seed=2) for family in ("llama", "qwen2", "qwen3")}


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1engine.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.timeout(600)
def test_train_on_a_transformers_checkpoint_then_export(hf_dirs, tmp_path, family):
    source = hf_dirs[family]
    out = tmp_path / "run"
    result = _cli("train", "--config", str(DEMO), "--no-progress", f"model.path={source}", f"output_dir={out}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["steps"] == 1
    model_dir = out / "checkpoints" / "step-000001" / "model"
    # the tokenizer and the source's config survive the checkpoint unchanged (MTP layers attached by demo.yaml)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (model_dir / name).read_bytes() == (source / name).read_bytes(), name
    saved, original = (json.loads((d / "config.json").read_text()) for d in (model_dir, source))
    assert saved.pop("num_nextn_predict_layers") == 1
    saved.pop("dtype", None), original.pop("dtype", None)
    assert saved == original  # bos/eos/pad ids, rope parameters, architecture: all the source's
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["step"] == 1 and "loss/policy" in records[-1]
    # export: a plain transformers directory with the trained weights
    export = tmp_path / "export"
    result = _cli("export", str(out), str(export))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((export / "config.json").read_text()).get("num_nextn_predict_layers") is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    trained = PolicyModel.from_pretrained(model_dir).eval()
    ids = torch.randint(0, trained.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained(ids, compute_logits=True).logits, atol=2e-5, rtol=1e-4)
    before = PolicyModel.from_pretrained(source)
    assert not torch.equal(before.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)


@pytest.mark.timeout(600)
def test_trainer_takes_model_and_tokenizer_from_the_caller(hf_dirs, tmp_path):
    source = hf_dirs["qwen2"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", *SMALL, "model.mtp_layers=1", "sft.steps=0", "grpo.beta=0"])
    trainer = GRPOTrainer(cfg, model=hf, tokenizer=tokenizer, progress=False)
    try:
        assert isinstance(trainer.model, PolicyModel) and trainer.model.config.num_mtp_layers == 1
        assert trainer.codec.encode("1+2=") == tokenizer.encode("1+2=")  # Qwen: no BOS, no None ids
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 1
    model_dir = tmp_path / "checkpoints" / "step-000001" / "model"
    assert (model_dir / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="tokenizer: a model passed to the trainer needs its tokenizer"):
        GRPOTrainer(cfg, model=hf, progress=False)


@pytest.mark.timeout(600)
def test_mtp_warmup_trains_only_the_mtp_layers(hf_dirs, tmp_path):
    source = hf_dirs["llama"]
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", *SMALL, "sft.steps=0", "grpo.steps=1", "model.mtp_layers=1",
                             f"model.path={source}", "model.mtp_warmup_steps=3", "model.mtp_init=random"])  # fmt: skip
    trainer = GRPOTrainer(cfg, progress=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    try:
        warm = trainer._warm_up_mtp()
        after = trainer.model.state_dict()
        changed = {k for k in start if not torch.equal(start[k], after[k])}
        assert changed and all(".mtp_layers." in k for k in changed)
        assert warm["mtp_warmup/steps"] == 3 and 0 < warm["mtp_warmup/loss_last"] < 20
        assert 0.0 <= warm["mtp_warmup/acceptance_after"] <= 1.0
        # the rollout engine drafts with the warmed-up layer
        engine_mtp = dict(trainer.rollout.model.named_weights())["model.mtp_layers.0.input_proj.weight"]
        torch.testing.assert_close(engine_mtp, after["model.mtp_layers.0.input_proj.weight"])
    finally:
        trainer.close()


def test_script_without_main_guard_is_refused(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "from r1engine.trainer import GRPOTrainer, load_config\n"
        "cfg = load_config(None, ['grpo.steps=1'])\n"
        "trainer = GRPOTrainer(cfg)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "line 3" in result.stderr and 'if __name__ == "__main__":' in result.stderr
    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        "from r1engine.trainer.script_guard import check_main_guard\n"
        "def main():\n    check_main_guard()\n    print('ok')\n"
        "if __name__ == '__main__':\n    main()\n"
    )
    result = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _break(path: Path, **changes) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", r"model.path: '.*nowhere' does not exist"),
        ("not_a_model", r"model.path: '.*' is not a model directory"),
        ("gpt2", r"model.path: .*architectures\[0\]: 'GPT2LMHeadModel' is not supported"),
        ("rope", r"rope_scaling.rope_type: 'dynamic' is not supported"),
        ("no_vocab", r"vocab_size: missing from config.json"),
        (
            "big_tokenizer",
            r"model.tokenizer: the tokenizer has 320 tokens but the model's embedding has vocab_size=100",
        ),  # noqa: E501
        ("small_tokenizer", r"model.tokenizer: the tokenizer has 101 tokens for a model with vocab_size=320"),
        ("negative_mtp", r"model.mtp_layers: must be >= 0, got -1"),
        ("spec_without_mtp", r"rollout.num_speculative_tokens: .* needs MTP layers"),
        ("chat_on_preset", r"data.template: 'chat' needs a model.path"),
    ],
)
def test_bad_model_input_is_one_line_naming_the_key(hf_dirs, tmp_path, case, match):
    import shutil

    source = tmp_path / "m"
    shutil.copytree(hf_dirs["qwen2"], source)
    args = [f"model.path={source}", "model.mtp_layers=1"]
    if case == "missing":
        args = [f"model.path={tmp_path / 'nowhere'}"]
    elif case == "not_a_model":
        args = [f"model.path={tmp_path}"]
    elif case == "gpt2":
        _break(source, architectures=["GPT2LMHeadModel"])
    elif case == "rope":
        _break(source, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    elif case == "no_vocab":
        _break(source, vocab_size=None)
    elif case == "big_tokenizer":
        small = make_tiny_hf_model("qwen2", tmp_path / "small", vocab_size=100)
        args = [f"model.path={small}", f"model.tokenizer={source}", "model.mtp_layers=1"]
    elif case == "small_tokenizer":
        from r1engine.models import build_char_tokenizer

        build_char_tokenizer(tmp_path / "chars")
        args += [f"model.tokenizer={tmp_path / 'chars'}"]
    elif case == "negative_mtp":
        args = [f"model.path={source}", "model.mtp_layers=-1"]
    elif case == "spec_without_mtp":
        args = [f"model.path={source}", "model.mtp_layers=0"]
    elif case == "chat_on_preset":
        args = ["data.template=chat"]
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, args)
    if case not in ("missing", "gpt2", "big_tokenizer"):  # the command line's handling, for a few of them
        return
    result = _cli("train", "--config", str(DEMO), f"output_dir={tmp_path / 'run'}", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("r1engine: config error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started


def test_export_errors_are_one_line(tmp_path):
    result = _cli("export", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("r1engine: export error: CHECKPOINT:")
    assert "Traceback" not in result.stderr
    result = _cli("convert", str(tmp_path / "model.gguf"), str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("r1engine: convert error: MODEL.gguf:")
