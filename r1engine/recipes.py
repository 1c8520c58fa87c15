"""Multi-stage recipes: R1-Zero, R1 and distillation as a list of stages, each reading the model directory the
stage before it wrote.

A recipe file (YAML; see `configs/recipes/`):

    output_dir: runs/r1
    config: ../demo.yaml                 # the training config every stage starts from (relative to this file)
    overrides: {grpo.max_new_tokens: 96} # dotted keys, for every stage
    stages:
      - {name: base, kind: sft, data: {source: corpus, mix: {direct: 0.6, compact: 0.3, readable: 0.1}}}
      - {name: rl, kind: grpo, from: base, overrides: {grpo.steps: 40}}
      - {name: traces, kind: sample, from: rl, prompts: 256, samples: 4, temperature: 0.7}
      - {name: student, kind: sft, data: {source: traces, stage: traces}, overrides: {model.preset: tiny}}

Stage kinds:
  sft     supervised fine-tuning of `from`'s model (or a fresh model of `model.preset`) on `data`:
          corpus  a base model's pre-training text: each problem answered in a style drawn from `mix`
                  (direct answers, compact or readable worked solutions; see `AdditionTask.solution`)
          task    the task's worked solutions in `style`, from `unique` distinct problems (0: endless)
          traces  the completions a `sample` stage kept
  grpo    the GRPO trainer (`r1engine.trainer.create_trainer`; PPO with grpo.advantage=gae) starting from `from`'s
          model (without `from`: the config's `model`, e.g. a Hugging Face checkpoint), no cold start;
          `reward_models: {<name>: <stage>}` gives the config's `reward_models.<name>.path` the model a
          `reward_model` stage trained (R1's second RL stage: rule rewards for reasoning rows, reward models for
          general rows, `rewards.routes` and `rewards.model_rewards_from_step` in the stage's overrides)
  sample  rejection sampling: `samples` completions per prompt at `temperature` from `from`'s model, scored with
          the stage's `rewards.weights` (reward models too: `rm:<name>` with `reward_models: {<name>: <stage>}`);
          per prompt the best completion that is correct and well formatted is kept
  reward_model
          `r1engine train-rm` with the config `rm` (the keys of r1engine/reward_models/config.py, nested; its
          output_dir is the stage's directory): a pairwise helpfulness or pointwise safety model
The sft and sample stages run on the built-in task (the character-level model); grpo and reward_model stages also
take a Hugging Face model and data files (`model.path`, `data.train_files`), and record the trainer's own held-out
evaluation (per data source when there are several).
Every stage writes `<output_dir>/<name>/`: `model/` (safetensors, loadable by vLLM; `sample` writes
`traces.jsonl` instead) and `stage.json` (what it did, held-out accuracy of its model). A finished stage is
skipped when the recipe runs again, so an interrupted recipe continues where it stopped; the GRPO stages also
resume from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from r1engine.data import SOLUTION_STYLES
from r1engine.models import TextCodec, build_char_tokenizer
from r1engine.trainer import create_trainer
from r1engine.trainer.config import Config, ConfigError, config_from_dict, set_dotted
from r1engine.trainer.grpo import build_policy, build_task

STAGE_KINDS = ("sft", "grpo", "sample", "reward_model")
DATA_SOURCES = ("corpus", "task", "traces")


@dataclass
class Stage:
    name: str
    kind: str
    source: str | None = None
    """The stage whose model this one starts from (`from` in YAML); None: a fresh model."""
    data: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    prompts: int = 256
    samples: int = 4
    temperature: float = 0.7
    rm: dict[str, Any] = field(default_factory=dict)
    """reward_model stages: the reward model's training config (nested keys of r1engine.reward_models.config)."""
    reward_models: dict[str, str] = field(default_factory=dict)
    """grpo stages: reward-model name -> the reward_model stage whose model it is."""


@dataclass
class Recipe:
    output_dir: Path
    config: dict[str, Any]
    """The base training config (nested dict) with the recipe-wide overrides applied."""
    stages: list[Stage]

    def stage_config(self, stage: Stage) -> Config:
        data = self.config
        for key, value in stage.overrides.items():
            data = set_dotted(data, key, value)
        for name, source in stage.reward_models.items():
            model_dir = self.output_dir / source / "model"
            # before its stage has run the model does not exist; the rest of the config is validated meanwhile
            path = model_dir if model_dir.exists() else Path.cwd()
            data = set_dotted(data, f"reward_models.{name}.path", str(path))
        try:
            return config_from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"stages.{stage.name}.overrides: {exc}") from exc


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file; `overrides` are `key=value`: `output_dir=...`, `stages.<name>.<field>=...` for one
    stage (a stage field such as `prompts`, else a training-config key), anything else a config key for every
    stage. Every stage's config is built and validated here, so a mistake fails before any training."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"output_dir", "config", "overrides", "stages", "description"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown recipe key (known: output_dir, config, overrides, stages)")
    base: dict = {}
    if raw.get("config"):
        base_path = (path.parent / raw["config"]).resolve()
        if not base_path.is_file():
            raise ConfigError(f"config: {str(base_path)!r} does not exist")
        base = yaml.safe_load(base_path.read_text()) or {}
    for key, value in (raw.get("overrides") or {}).items():
        base = set_dotted(base, key, value)
    stages = [_parse_stage(s, i) for i, s in enumerate(raw.get("stages") or [])]
    output_dir = raw.get("output_dir", f"runs/{path.stem}")
    by_name = {s.name: s for s in stages}
    for override in overrides:
        key, _, text = override.partition("=")
        if not _:
            raise ConfigError(f"override {override!r}: expected key=value")
        value = yaml.safe_load(text) if text else ""
        if key == "output_dir":
            output_dir = value
        elif key.startswith("stages."):
            _, name, sub = (key.split(".", 2) + ["", ""])[:3]
            if name not in by_name or not sub:
                raise ConfigError(f"{key}: no stage named {name!r} (stages: {', '.join(by_name)})")
            stage = by_name[name]
            if sub in {"prompts", "samples", "temperature"}:
                setattr(stage, sub, type(getattr(stage, sub))(value))
            else:
                stage.overrides = {**stage.overrides, sub: value}
        else:
            base = set_dotted(base, key, value)
    recipe = Recipe(Path(output_dir), base, stages)
    _validate(recipe)
    return recipe


def _parse_stage(raw: Any, index: int) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(raw, dict) or "name" not in raw or "kind" not in raw:
        raise ConfigError(f"{where}: a stage needs at least `name` and `kind`")
    known = {f.name for f in dataclasses.fields(Stage)} - {"source"} | {"from"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown stage key (known: {', '.join(sorted(known))})")
    options = {k: v for k, v in raw.items() if k != "from"}
    return Stage(source=raw.get("from"), **options)


def _validate(recipe: Recipe) -> None:
    if not recipe.stages:
        raise ConfigError("stages: a recipe needs at least one stage")
    seen: dict[str, Stage] = {}
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}] ({stage.name})"
        if stage.name in seen:
            raise ConfigError(f"{where}.name: two stages are named {stage.name!r}")
        if stage.kind not in STAGE_KINDS:
            raise ConfigError(f"{where}.kind: must be one of {STAGE_KINDS}, got {stage.kind!r}")
        if stage.source is not None and (stage.source not in seen or seen[stage.source].kind == "sample"):
            raise ConfigError(f"{where}.from: {stage.source!r} is not an earlier stage that writes a model")
        if stage.kind == "sample" and stage.source is None:
            raise ConfigError(f"{where}.from: a sample stage starts from an earlier stage's model")
        if stage.kind == "reward_model" and stage.source is not None:
            raise ConfigError(f"{where}.from: a reward_model stage starts from `rm.model.path`, not a stage")
        if stage.rm and stage.kind != "reward_model":
            raise ConfigError(f"{where}.rm: only reward_model stages take a reward-model config")
        if stage.reward_models and stage.kind not in ("grpo", "sample"):
            raise ConfigError(f"{where}.reward_models: only grpo and sample stages use reward models")
        for name, source in stage.reward_models.items():
            if source not in seen or seen[source].kind != "reward_model":
                raise ConfigError(f"{where}.reward_models.{name}: {source!r} is not an earlier reward_model stage")
        if stage.kind == "sft":
            source = stage.data.get("source")
            if source not in DATA_SOURCES:
                raise ConfigError(f"{where}.data.source: must be one of {DATA_SOURCES}, got {source!r}")
            traces_from = seen.get(stage.data.get("stage", ""))
            if source == "traces" and (traces_from is None or traces_from.kind != "sample"):
                raise ConfigError(f"{where}.data.stage: {stage.data.get('stage')!r} is not an earlier sample stage")
            styles = list((stage.data.get("mix") or {}).keys()) + [stage.data.get("style", "compact")]
            bad = [s for s in styles if s not in SOLUTION_STYLES]
            if bad:
                raise ConfigError(f"{where}.data: unknown solution style {bad[0]!r} (known: {SOLUTION_STYLES})")
        if stage.kind == "sample" and (stage.prompts < 1 or stage.samples < 1 or stage.temperature <= 0):
            raise ConfigError(f"{where}: prompts and samples must be >= 1 and temperature > 0")
        if stage.kind == "reward_model":
            _rm_config(recipe, stage)  # the reward model's training config is valid
        else:
            cfg = recipe.stage_config(stage)  # every stage's training config is valid
            if stage.kind in ("sft", "sample") and (cfg.data.train_files or cfg.model.path):
                raise ConfigError(
                    f"{where}.kind: {stage.kind} stages run on the built-in task's character-level model; this "
                    "config names a model or data files (model.path, data.train_files)"
                )
        seen[stage.name] = stage


# ----------------------------------------------------------------------------------------------- running
class RecipeRunner:
    def __init__(self, recipe: Recipe, *, progress: bool = True):
        self.recipe = recipe
        self.progress = progress
        self.root = recipe.output_dir
        self.root.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def run(self) -> list[dict[str, Any]]:
        """Run every stage not finished yet; returns each stage's record (`stage.json`)."""
        records = []
        for stage in self.recipe.stages:
            done = self.stage_dir(stage.name) / "stage.json"
            if done.is_file():
                self._say(f"stage {stage.name}: done already, skipped")
            else:
                start = stage.source or ("rm.model" if stage.kind == "reward_model" else "the config's model")
                self._say(f"stage {stage.name} ({stage.kind}) from {start}")
                t0 = time.perf_counter()
                cfg = self.recipe.stage_config(stage) if stage.kind != "reward_model" else None  # it has its own
                record = getattr(self, f"_run_{stage.kind}")(stage, cfg)
                record.update(name=stage.name, kind=stage.kind, source=stage.source, wall_s=time.perf_counter() - t0)
                _write_json_atomic(done, record)
                self._say(f"stage {stage.name}: {_describe(record)}")
            records.append(json.loads(done.read_text()))
        write_summary(self.root, records)
        return records

    # ------------------------------------------------------------------------------------------- stages
    def _model(self, stage: Stage, cfg: Config):
        """`from`'s model, or a fresh model of the stage's `model.preset`."""
        source = str(self.stage_dir(stage.source) / "model") if stage.source is not None else None
        return build_policy(dataclasses.replace(cfg.model, path=source), len(build_char_tokenizer()), cfg.seed)

    def _run_sft(self, stage: Stage, cfg: Config) -> dict[str, Any]:
        import torch

        from r1engine.trainer.distributed import training_device
        from r1engine.trainer.sft import supervised_finetune

        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        torch.manual_seed(cfg.seed)
        model = self._model(stage, cfg).to(training_device(cfg.training.device))
        codec = _codec()
        losses = supervised_finetune(
            model, self._examples(stage, cfg, build_task(cfg)), codec.encode, codec.eos_id,
            steps=cfg.sft.steps, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, chunk_len=cfg.training.chunk_len,
            mtp_coef=cfg.grpo.mtp_loss_coef, loss_backend=cfg.training.loss_backend, progress=self.progress,
            desc=f"{stage.name} (SFT)",
        )  # fmt: skip
        self._save_model(model, codec.tokenizer, stage)
        return {"data": stage.data, "sft_steps": cfg.sft.steps, "final_ce": losses[-1] if losses else None,
                **self._evaluate(stage, cfg)}  # fmt: skip

    def _examples(self, stage: Stage, cfg: Config, task) -> Iterator[tuple[str, str]]:
        data = stage.data
        if data["source"] == "traces":
            rows = [json.loads(line) for line in (self.stage_dir(data["stage"]) / "traces.jsonl").open()]
            if not rows:
                raise RuntimeError(f"stage {data['stage']} kept no traces: nothing to fine-tune {stage.name} on")
            return _shuffled_cycle([(r["prompt"], r["completion"]) for r in rows], cfg.seed)
        stream = task.train_problems(seed=cfg.seed)
        if data["source"] == "task":
            unique = int(data.get("unique", 0))
            problems = stream.take(unique) if unique else stream
            style = data.get("style", "compact")
            source = _shuffled_cycle(problems, cfg.seed) if unique else problems
            return ((p.prompt, task.solution(p, style)) for p in source)
        mix = data.get("mix") or {"compact": 1.0}
        rng = random.Random(cfg.seed)
        styles, weights = list(mix), list(mix.values())
        return ((p.prompt, task.solution(p, rng.choices(styles, weights)[0])) for p in stream)

    def _run_grpo(self, stage: Stage, cfg: Config) -> dict[str, Any]:
        out = self.stage_dir(stage.name)
        cfg = dataclasses.replace(cfg, output_dir=str(out), sft=dataclasses.replace(cfg.sft, steps=0))
        if stage.source is not None:
            cfg.model = dataclasses.replace(cfg.model, path=str(self.stage_dir(stage.source) / "model"))
        trainer = create_trainer(cfg, progress=self.progress)  # the PPO trainer for grpo.advantage=gae
        try:
            summary = trainer.run()
        finally:
            trainer.close()
        final = trainer.checkpoints.latest()
        shutil.rmtree(out / "model", ignore_errors=True)
        shutil.copytree(final / "model", out / "model")
        record = {"grpo_steps": summary["steps"], "temperature": cfg.grpo.temperature,
                  "rewards": cfg.rewards.routes or cfg.rewards.weights,
                  "reward_models": {name: str(spec.path) for name, spec in cfg.reward_models.items()}}  # fmt: skip
        if _builtin_task(cfg):
            return {**record, **self._evaluate(stage, cfg)}
        # a user's model and data: the trainer's own held-out evaluation of its last step (per source)
        return {**record, **_last_evaluation(out / "metrics.jsonl")}

    def _run_reward_model(self, stage: Stage, _: None) -> dict[str, Any]:
        from r1engine.reward_models.train import train_reward_model

        rm_cfg = _rm_config(self.recipe, stage)
        out = Path(rm_cfg.output_dir)
        shutil.rmtree(out / "model", ignore_errors=True)  # an interrupted run's partial model (stage.json is unwritten)
        summary = train_reward_model(rm_cfg, progress=self.progress, log=self._say)
        numbers = {f"rm/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "steps"}
        return {"kind_of_model": rm_cfg.kind, "input": rm_cfg.input_kind, "rm_steps": summary.get("steps"), **numbers}

    def _run_sample(self, stage: Stage, cfg: Config) -> dict[str, Any]:
        from r1engine.rewards import get_reward
        from r1engine.rollout import create_engine

        codec, task = _codec(), build_task(cfg)
        problems = task.train_problems(seed=cfg.seed + 1).take(stage.prompts)
        engine = create_engine(cfg.rollout.backend, model_dir=str(self.stage_dir(stage.source) / "model"),
                               num_speculative_tokens=cfg.rollout.num_speculative_tokens,
                               max_model_len=cfg.training.chunk_len)  # fmt: skip
        batch = engine.generate(
            [codec.encode(p.prompt) for p in problems], n=stage.samples, max_new_tokens=cfg.grpo.max_new_tokens,
            temperature=stage.temperature, top_p=cfg.rollout.top_p, stop_token_ids=[codec.eos_id],
            seed=cfg.seed,
        )  # fmt: skip
        texts = [codec.decode(c) for c in batch.completion_ids]
        owner = batch.prompt_index.tolist()
        answers = [problems[i].answer for i in owner]
        scores = self._sample_rewards(cfg, texts, [problems[i] for i in owner], owner)
        correct = [r.score for r in get_reward(task.accuracy_reward)(texts, answers)]
        formatted = [r.score for r in get_reward("format")(texts, answers)]
        best: dict[int, tuple[float, int]] = {}
        for j, i in enumerate(owner):
            if correct[j] == 1.0 and formatted[j] == 1.0:  # rejection: wrong or malformed answers never kept
                key = (scores[j], -len(texts[j]))  # best reward, then the shortest
                if i not in best or key > best[i][0]:
                    best[i] = (key, j)
        path = self.stage_dir(stage.name) / "traces.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for i in sorted(best):
                j = best[i][1]
                f.write(json.dumps({"prompt": problems[i].prompt, "completion": texts[j],
                                    "reward": scores[j]}) + "\n")  # fmt: skip
        return {
            "prompts": stage.prompts,
            "samples_per_prompt": stage.samples,
            "temperature": stage.temperature,
            "sample_accuracy": sum(correct) / len(correct),
            "kept": len(best),
            "kept_fraction": len(best) / stage.prompts,
        }

    # ------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _sample_rewards(cfg: Config, texts: list[str], rows: list, owner: list[int]) -> list[float]:
        """The sample stage's ranking reward of each completion: `rewards.weights`' rule rewards plus its reward
        models (`rm:<name>`, each prompt's samples compared as the GRPO trainer compares a group)."""
        from r1engine.reward_models.routing import split_weights
        from r1engine.rewards import CombinedReward
        from r1engine.rewards.routing import RewardRoutes
        from r1engine.trainer.model_rewards import ModelRewards

        rules, models = split_weights(cfg.rewards.weights)
        scores = CombinedReward(rules).evaluate(texts, [p.answer for p in rows]).scores if rules else [0.0] * len(texts)
        if not models:
            return list(scores)
        judges = ModelRewards(cfg, RewardRoutes(cfg.rewards.weights), device="cpu")
        try:  # rule_handle None: the rule rewards are the ones above
            scored = judges.submit(None, [], texts, rows, owner, step=cfg.rewards.model_rewards_from_step).result()
        finally:
            judges.close()
        return [a + b for a, b in zip(scores, scored.scores, strict=True)]

    def _save_model(self, model, tokenizer, stage: Stage) -> None:
        out = self.stage_dir(stage.name)
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, tokenizer)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")

    def _evaluate(self, stage: Stage, cfg: Config) -> dict[str, float]:
        """Held-out accuracy of the stage's model, with the same protocol for every stage."""
        from r1engine.rewards.routing import RewardRoutes
        from r1engine.rollout import create_engine
        from r1engine.trainer.evaluation import Correctness, held_out_accuracy

        codec, task = _codec(), build_task(cfg)
        engine = create_engine("native", model_dir=str(self.stage_dir(stage.name) / "model"),
                               max_model_len=cfg.training.chunk_len)  # fmt: skip
        correct = Correctness(RewardRoutes({task.accuracy_reward: 1.0}))
        return held_out_accuracy(
            engine.generate, task.eval_problems, codec.encode, codec.decode, correct,
            cfg=cfg.eval, max_new_tokens=cfg.grpo.max_new_tokens, stop_token_ids=[codec.eos_id],
        )  # fmt: skip

    @staticmethod
    def _say(text: str) -> None:
        tqdm.write(f"[r1engine recipe] {text}")


def write_summary(root: Path, records: list[dict[str, Any]]) -> Path:
    """`summary.md` (a table of the stages) and `summary.png` (held-out accuracy after each stage)."""
    lines = ["| stage | kind | from | held-out pass@1 | greedy | response length | notes | wall |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        notes = (f"kept {r['kept']}/{r['prompts']} prompts (sample accuracy {r['sample_accuracy']:.2f})"
                 if r["kind"] == "sample" else
                 f"{r['rm_steps']} steps, {_rm_accuracy(r)}" if r["kind"] == "reward_model" else
                 f"{r.get('grpo_steps', r.get('sft_steps'))} steps")  # fmt: skip
        acc = r.get("eval/accuracy")
        cells = [f"{acc:.3f}" if acc is not None else "-",
                 f"{r['eval/greedy_accuracy']:.3f}" if acc is not None else "-",
                 f"{r['eval/response_len_mean']:.1f}" if acc is not None else "-"]  # fmt: skip
        lines.append(f"| {r['name']} | {r['kind']} | {r['source'] or '-'} | {' | '.join(cells)} | {notes} | "
                     f"{r['wall_s']:.0f} s |")  # fmt: skip
    path = root / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    evaluated = [r for r in records if r.get("eval/accuracy") is not None]
    if evaluated:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(evaluated), 3.4))
        x = range(len(evaluated))
        ax.bar([i - 0.2 for i in x], [r["eval/accuracy"] for r in evaluated], 0.4, label="pass@1 (sampled)")
        ax.bar([i + 0.2 for i in x], [r["eval/greedy_accuracy"] for r in evaluated], 0.4, label="greedy")
        ax.set_xticks(list(x), [r["name"] for r in evaluated], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(root / "summary.png", dpi=110)
        plt.close(fig)
    return path


def _describe(record: dict[str, Any]) -> str:
    if record["kind"] == "sample":
        return f"kept {record['kept']} of {record['prompts']} prompts ({record['wall_s']:.0f} s)"
    if record["kind"] == "reward_model":
        return f"reward model trained, {_rm_accuracy(record)} ({record['wall_s']:.0f} s)"
    return (f"held-out pass@1 {record['eval/accuracy']:.3f}, greedy {record['eval/greedy_accuracy']:.3f}, "
            f"response length {record['eval/response_len_mean']:.1f} ({record['wall_s']:.0f} s)")  # fmt: skip


def _rm_accuracy(record: dict[str, Any]) -> str:
    """A reward_model stage's held-out accuracy before and after training."""
    acc = "pairwise_acc" if record["kind_of_model"] == "pairwise" else "classifier_acc"
    before, after = record.get(f"rm/initial_{acc}", float("nan")), record.get(f"rm/{acc}", float("nan"))
    return f"held-out {acc.replace('_', ' ')} {before:.3f} -> {after:.3f}"


def _builtin_task(cfg: Config) -> bool:
    """Whether the stage trains the character-level model on the built-in task (not a user's model and data)."""
    return not cfg.data.train_files


def _last_evaluation(metrics_path: Path) -> dict[str, float]:
    """The `eval/*` metrics of the last evaluated step in a trainer's metrics.jsonl."""
    last: dict[str, float] = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "eval/accuracy" in record:
            last = {k: v for k, v in record.items() if k.startswith("eval/")}
    return last


def _rm_config(recipe: Recipe, stage: Stage):
    """A reward_model stage's training config, written to the stage's directory; errors name the stage."""
    from r1engine.config_file import from_dict
    from r1engine.reward_models.config import RMConfig, validate_rm_config

    data = set_dotted(dict(stage.rm), "output_dir", str(recipe.output_dir / stage.name))
    try:
        cfg = from_dict(RMConfig, data)
        validate_rm_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"stages.{stage.name}.rm.{exc}") from None
    return cfg


def _shuffled_cycle(items: list, seed: int) -> Iterator:
    """Endless passes over `items` (epochs), each in a fresh random order."""
    rng = random.Random(seed)
    for _ in itertools.count():
        order = list(items)
        rng.shuffle(order)
        yield from order


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


def _codec() -> TextCodec:
    return TextCodec(build_char_tokenizer())
