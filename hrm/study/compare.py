"""``hrm compare``: architectures at matched parameters and the same training-FLOP budget.

A study is a set of runs, one per (architecture, seed), each an ordinary ``hrm train`` run
in its own directory under ``OUT/runs/``, started as a child process:

1. **Parameters.** The base model (``--preset`` with ``--override``s) is the HRM; every
   other architecture gets the same blocks (``n_layers`` in total: HRM splits them between
   its two stacks, the Transformer and the universal transformer keep one stack), which
   matches parameters exactly; when that is off by more than :data:`PARAM_TOLERANCE`,
   ``n_layers`` is moved to the closest count (:func:`matched_configs`).
2. **Steps.** The learning-rate schedule and the ``bp_steps`` warm-up need the step count
   up front, so it is planned from the FLOP budget: the largest ``steps`` whose exact
   training FLOPs (:mod:`hrm.flops`, over the very rows the run's loader will yield, with
   the ``bp_steps`` of each step) fit the budget (:func:`plan_steps`). The run's
   ``metrics.jsonl`` then logs the same count.
3. **Evaluation along the way**: held-out exact match ``evals`` times per run, at even
   step intervals (each also a checkpoint).
4. **Resumable**: ``OUT/study.json`` holds the study's settings and plan; a finished run
   is skipped, a partial one continues with ``hrm train --resume`` from its latest
   checkpoint, bit for bit on a CPU.

The table and the plot come from the runs' ``metrics.jsonl`` (:mod:`hrm.study.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from hrm.checkpoint import read_config
from hrm.config import ARCHS, ModelConfig, bp_steps_at
from hrm.errors import ConfigError, HrmError
from hrm.flops import RowWork, num_parameters, train_step_flops
from hrm.training.config import TrainConfig
from hrm.training.metrics import read_metrics

PARAM_TOLERANCE = 0.05  # parameter counts of the compared models differ by at most this fraction
STUDY_FILE = "study.json"
RUNS = "runs"
RUN_TIME_FILE = "study_seconds.json"  # wall seconds the study spent in a run's child processes


@dataclass(frozen=True)
class StudySpec:
    """What a study depends on (``OUT/study.json``); a resumed study must not change it."""

    task: str
    budget_flops: float
    archs: tuple[str, ...] = ARCHS
    seeds: int = 2  # seeds 0 .. seeds-1
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_tokens: int = 1024
    train_samples: int = 200_000
    evals: int = 8  # held-out evaluations per run
    eval_samples: int = 300

    def __post_init__(self) -> None:
        object.__setattr__(self, "archs", tuple(self.archs))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown or not self.archs or len(set(self.archs)) != len(self.archs):
            raise ConfigError(f"--archs must name distinct architectures of {', '.join(ARCHS)}, got {self.archs}")
        if not self.budget_flops > 0:
            raise ConfigError(f"--budget-flops must be positive, got {self.budget_flops}")
        for name in ("seeds", "evals", "eval_samples", "batch_tokens", "train_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if "arch" in self.model_overrides:
            raise ConfigError("the architectures come from --archs, not from --override arch=...")
        self.train_config("hrm", 0, 1, "x")  # validates task, preset and overrides

    def train_config(self, arch: str, seed: int, steps: int, out: str, **model: Any) -> TrainConfig:
        """The ``hrm train`` configuration of one run (``model``: ModelConfig fields over the base)."""
        every = -(-steps // self.evals)  # evaluations at every, 2 * every, ... and the last step
        return TrainConfig(
            preset=self.preset,
            model_overrides={**self.model_overrides, **model, "arch": arch},
            task=self.task,
            train_samples=self.train_samples,
            steps=steps,
            batch_tokens=self.batch_tokens,
            seed=seed,
            out=out,
            eval_every=every,
            save_every=every,
            eval_samples=self.eval_samples,
        )

    def base_model(self) -> ModelConfig:
        """The HRM every architecture is matched to: the preset with the overrides."""
        from hrm.data import load_tokenizer

        cfg = self.train_config("hrm", 0, 1, "x")
        return cfg.model_config(load_tokenizer(cfg.tokenizer).vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "archs": list(self.archs)}


# -- planning ------------------------------------------------------------------------------------
def matched_configs(base: ModelConfig, archs: tuple[str, ...]) -> dict[str, ModelConfig]:
    """Each architecture's model with the parameter count of ``base.replace(arch="hrm")``:
    the same blocks, or else the ``n_layers`` whose count is closest. ConfigError when no
    count is within :data:`PARAM_TOLERANCE`."""
    base = base.replace(arch="hrm")
    target = num_parameters(base)
    out = {}
    for arch in archs:
        candidates = [base.replace(arch=arch)] + [
            base.replace(arch=arch, n_layers=n)
            for n in range(1, 2 * base.n_layers + 1)
            if n != base.n_layers and (arch != "hrm" or n % 2 == 0)
        ]
        best = min(candidates, key=lambda c: abs(num_parameters(c) - target))  # ties: the same blocks
        if abs(num_parameters(best) - target) > PARAM_TOLERANCE * target:
            raise ConfigError(
                f"no {arch} model within {PARAM_TOLERANCE:.0%} of the HRM's {target} parameters "
                f"(closest: n_layers={best.n_layers}, {num_parameters(best)})"
            )
        out[arch] = best
    return out


class RowWorks:
    """The :class:`RowWork` of each step of a run's loader, computed as far as asked for.

    Built from the same samples, row budget and seed as the run (``hrm.training.loop``), so
    ``works[s]`` is exactly the row of step ``s``; the same for every architecture."""

    def __init__(self, cfg: TrainConfig) -> None:
        from hrm.data import PackedLoader, load_tokenizer
        from hrm.training.loop import load_samples

        tokenizer = load_tokenizer(cfg.tokenizer)
        samples, _, _ = load_samples(cfg, tokenizer, tokenizer.vocab_size)
        self._loader = PackedLoader(
            samples, cfg.batch_tokens, seed=cfg.seed, pad_id=tokenizer.pad_id, too_long=cfg.too_long
        )
        self._works: list[RowWork] = []

    def __getitem__(self, step: int) -> RowWork:
        while len(self._works) <= step:
            self._works.append(RowWork.of(next(self._loader)[0]))
        return self._works[step]


def run_flops(cfg: ModelConfig, works: Callable[[int], RowWork], steps: int) -> int:
    """Training FLOPs of a run of ``steps`` steps (each with its own ``bp_steps``)."""
    return sum(train_step_flops(cfg, works(s), bp_steps_at(cfg, s, steps)).total for s in range(steps))


def plan_steps(cfg: ModelConfig, works: Callable[[int], RowWork], budget: float) -> tuple[int, int]:
    """``(steps, flops)``: the most steps whose run fits ``budget`` training FLOPs, and that
    run's FLOPs. A longer run has a longer ``bp_steps`` warm-up, so its first steps get
    cheaper: the count is searched, not divided."""
    if run_flops(cfg, works, 1) > budget:
        raise ConfigError(f"--budget-flops {budget:.3g} is less than one training step of the {cfg.arch} model")
    # a first guess at an upper bound (doubled while short): scale a run at bp_max's step cost to the budget
    guess = max(1, int(budget / train_step_flops(cfg, works(0), cfg.bp_max).total))
    lo, hi = 1, max(2, int(1.02 * guess * budget / run_flops(cfg, works, guess)) + 2)
    while run_flops(cfg, works, hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # run_flops(lo) <= budget < run_flops(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if run_flops(cfg, works, mid) <= budget else (lo, mid)
    return lo, run_flops(cfg, works, lo)


def plan(spec: StudySpec) -> list[dict[str, Any]]:
    """One entry per run: ``arch``, ``seed``, ``name``, ``model`` (its ModelConfig fields over
    the base), ``params``, ``steps`` and planned ``flops``."""
    base = spec.base_model()
    models = matched_configs(base, spec.archs)
    runs = []
    for seed in range(spec.seeds):
        works = RowWorks(spec.train_config("hrm", seed, 1, "x"))
        for arch in spec.archs:
            model = models[arch]
            steps, flops = plan_steps(model, works.__getitem__, spec.budget_flops)
            changed = {k: v for k, v in model.to_dict().items() if v != base.to_dict()[k] and k != "arch"}
            runs.append(
                {
                    "arch": arch,
                    "seed": seed,
                    "name": f"{arch}-seed{seed}",
                    "model": changed,
                    "params": num_parameters(model),
                    "steps": steps,
                    "flops": flops,
                }
            )
    return runs


# -- running -------------------------------------------------------------------------------------
def train_argv(cfg: TrainConfig) -> list[str]:
    """``hrm train`` arguments that reproduce ``cfg`` (the fields that differ from the defaults)."""
    default = TrainConfig()
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        if f.name == "model_overrides":
            for key, v in value.items():
                argv += ["--override", f"{key}={v}"]
        elif isinstance(value, tuple):
            argv += ["--" + f.name.replace("_", "-"), *map(str, value)]
        else:
            argv += ["--" + f.name.replace("_", "-"), str(value)]
    return argv


def run_state(run_dir: Path, steps: int) -> str:
    """``"done"``, ``"partial"`` (a checkpoint short of ``steps``) or ``"new"``."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return "new"
    step = read_config(run_dir / "checkpoints" / latest.read_text().strip())[1]["step"]
    return "done" if step >= steps else "partial"


def _latest_flops(metrics: Path) -> float:
    records = read_metrics(metrics)
    return float(next((r["flops"] for r in reversed(records) if r.get("flops") is not None), 0))


def _run_child(argv: list[str], run_dir: Path, on_poll: Callable[[], None]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    timing = run_dir / RUN_TIME_FILE
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    begin = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        log.write("$ hrm " + " ".join(argv) + "\n")
        log.flush()
        child = subprocess.Popen([sys.executable, "-m", "hrm", *argv], stdout=log, stderr=subprocess.STDOUT)
        try:
            while child.poll() is None:
                on_poll()
                time.sleep(1.0)
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait()
            timing.write_text(json.dumps({"seconds": seconds + time.perf_counter() - begin}) + "\n")
    on_poll()
    if child.returncode != 0:
        raise HrmError(f"the run in {run_dir} failed (exit code {child.returncode}); see {run_dir / 'train.log'}")


def load_study(out: Path, spec: StudySpec) -> list[dict[str, Any]]:
    """The plan in ``OUT/study.json`` (checked against ``spec``), or a new plan written there."""
    path = out / STUDY_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["spec"] != spec.to_dict():
            changed = [k for k, v in spec.to_dict().items() if saved["spec"].get(k) != v]
            raise ConfigError(
                f"{out} holds a study with other settings ({', '.join(changed)} differ); pick another --out"
            )
        return saved["runs"]
    runs = plan(spec)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"spec": spec.to_dict(), "runs": runs}, indent=2) + "\n")
    os.replace(tmp, path)
    return runs


def run_study(
    spec: StudySpec, out: str | os.PathLike, backend: str | None = None
) -> Iterator[tuple[dict[str, Any], str]]:
    """Plan (or reload) the study in ``out`` and run what is left of it, with one progress bar
    over the training FLOPs of all runs. Yields ``(run, what was done)``: ``"skipped"``
    (finished before), ``"resumed"`` or ``"trained"``. ``backend`` (kernels, e.g. ``auto`` on
    a GPU) is passed to every ``hrm train``; it is not part of the study's settings."""
    out = Path(out)
    runs = load_study(out, spec)
    progress = tqdm(
        total=sum(r["flops"] for r in runs),
        unit="FLOP",
        unit_scale=True,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="hrm compare",
        disable=None,
    )
    done_flops = 0.0
    try:
        for run in runs:
            run_dir = out / RUNS / run["name"]
            state = run_state(run_dir, run["steps"])
            metrics = run_dir / "metrics.jsonl"

            def poll(base: float = done_flops, metrics: Path = metrics, name: str = run["name"]) -> None:
                progress.n = base + _latest_flops(metrics)
                progress.set_postfix_str(name, refresh=False)
                progress.refresh()

            if state == "done":
                what = "skipped"
            else:
                cfg = spec.train_config(run["arch"], run["seed"], run["steps"], str(run_dir), **run["model"])
                argv = ["train", "--resume", str(run_dir)] if state == "partial" else ["train", *train_argv(cfg)]
                argv += ["--backend", backend] if backend is not None else []
                _run_child(argv, run_dir, poll)
                what = "resumed" if state == "partial" else "trained"
            done_flops += run["flops"]
            progress.n = done_flops
            progress.refresh()
            yield run, what
    finally:
        progress.close()


__all__ = [
    "PARAM_TOLERANCE",
    "StudySpec",
    "matched_configs",
    "plan",
    "plan_steps",
    "run_flops",
    "run_study",
    "train_argv",
]
