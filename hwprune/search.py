"""The search: an ordinary multi-objective Optuna study over per-group pruning ratios.

Objectives: validation accuracy (up) and measured latency per device profile (down), optionally MACs (down).
Without data (latency-only work) the accuracy objective is replaced by the MACs a plan keeps (up), so the front
holds, for each latency, the plan that keeps the most compute. The latency budget is an Optuna constraint; a trial
over budget ends before any training and is recorded as infeasible. Trial 0 is the dense model with the same
recovery budget as every candidate.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import warnings
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import optuna

from hwprune.errors import BudgetError, ConfigError, RunError
from hwprune.latency import DeviceProfile
from hwprune.plan import PruningPlan
from hwprune.trial import LatencyMeter, TrialOutcome, run_trial
from hwprune.workload import Workload

SAMPLERS = ("nsga2", "tpe", "gp", "random")
PARAM_PREFIX = "ratio:"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)


@dataclass
class SearchConfig:
    out_dir: Path
    trials: int = 30  # total finished trials wanted in the study (a rerun resumes up to this number)
    timeout_s: Optional[float] = None
    latency_budget_ms: Optional[float] = None
    budget_profile: Optional[str] = None
    storage: Optional[str] = None  # Optuna storage URL; default: SQLite file in out_dir
    study_name: str = "hwprune"
    sampler: str = "nsga2"
    seed: int = 0
    macs_objective: bool = False
    progress: bool = True
    lut_path: Optional[str] = None  # latency lookup table of the budget profile: screen candidates before measuring
    screen_margin: float = 0.1  # skip a candidate predicted over the budget by more than this fraction


def objective_names(workload: Workload, profiles: Sequence[DeviceProfile], macs_objective: bool) -> List[str]:
    names = ["accuracy" if workload.data is not None else "macs_kept"]
    names += [f"latency_ms:{p.name}" for p in profiles]
    if macs_objective and workload.data is not None:
        names.append("macs")
    return names


def directions(names: Sequence[str]) -> List[str]:
    return ["maximize" if n in ("accuracy", "macs_kept") else "minimize" for n in names]


def storage_url(cfg: SearchConfig):
    """Any Optuna storage URL; ``redis://`` goes through Optuna's journal storage; default SQLite in the run dir."""
    url = cfg.storage or f"sqlite:///{(Path(cfg.out_dir) / 'study.db').resolve()}"
    if url.startswith(("redis://", "rediss://")):
        from optuna.storages.journal import JournalRedisBackend

        with warnings.catch_warnings():  # "experimental" since Optuna 3.1; it is the documented Redis storage
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.JournalStorage(JournalRedisBackend(url))
    if url.endswith(".log") and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    return url


def make_sampler(name: str, seed: int, trials: int, constrained: bool):
    constraints = _constraints if constrained else None
    if name == "nsga2":
        # A population no larger than a third of the budget, so that selection actually happens in short searches.
        pop = max(4, min(50, trials // 3))
        return optuna.samplers.NSGAIISampler(population_size=pop, seed=seed, constraints_func=constraints)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def _constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraint", [0.0])


def open_study(cfg: SearchConfig, names: Sequence[str], load_only: bool = False) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_url(cfg)
    if load_only:
        try:
            return optuna.load_study(study_name=cfg.study_name, storage=storage)
        except KeyError as e:
            raise RunError(f"no study {cfg.study_name!r} in {cfg.storage or cfg.out_dir}; check --study") from e
    sampler = make_sampler(cfg.sampler, cfg.seed, cfg.trials, cfg.latency_budget_ms is not None)
    study = optuna.create_study(
        study_name=cfg.study_name, storage=storage, sampler=sampler, directions=directions(names), load_if_exists=True
    )
    stored = study.user_attrs.get("objectives")
    if stored is not None and list(stored) != list(names):
        raise RunError(
            f"study {cfg.study_name!r} was created with objectives {stored}, not {list(names)}; use another --study "
            f"name or the same profiles and data"
        )
    return study


def offered_structures(workload: Workload, profiles: Sequence[DeviceProfile]) -> List[str]:
    """The catalog structures a search offers: those some target profile accelerates, or every allowed one with
    ``explore_all`` (size-only goals)."""
    choices = workload.space.structures
    if choices.explore_all:
        return list(choices.allowed)
    accelerated = {s for p in profiles for s in p.accelerates}
    return [s for s in choices.allowed if s in accelerated]


def plan_from_trial(workload: Workload, trial: optuna.Trial, structures: Sequence[str] = ()) -> PruningPlan:
    ratios = {g.name: trial.suggest_categorical(PARAM_PREFIX + g.name, list(workload.space.ratios)) for g in workload.groups}
    plan = workload.plan(ratios)
    if structures:
        from hwprune.structures import suggest_layer

        modules = dict(workload.model.named_modules())
        for layer in workload.structure_layers:
            spec = suggest_layer(trial, layer, modules[layer], list(structures), list(workload.space.structures.ratios))
            if spec is not None and spec.get("ratio", 0) > 0:
                plan.structures[layer] = spec
    methods = workload.space.recovery.method
    if len(methods) > 1:  # the space lists several recovery methods: one per trial, same step budget
        plan.recovery_method = trial.suggest_categorical("recovery.method", list(methods))
    return plan


def _values(outcome: TrialOutcome, names: Sequence[str], dense_macs: int) -> List[float]:
    vals = []
    for n in names:
        if n == "accuracy":
            # An infeasible trial is never trained; 0 is the worst accuracy and keeps the sampler informed.
            vals.append(outcome.accuracy if outcome.accuracy is not None else 0.0)
        elif n == "macs_kept":
            vals.append(outcome.costs.macs / dense_macs)
        elif n == "macs":
            vals.append(float(outcome.costs.macs))
        else:
            vals.append(outcome.latency[n.split(":", 1)[1]].median_ms)
    return vals


def check_budget(workload: Workload, meter: LatencyMeter, cfg: SearchConfig, log: Callable[[str], None]) -> None:
    """Fail fast when even the most pruned plan in the space is over the latency budget."""
    if cfg.latency_budget_ms is None:
        return
    name = cfg.budget_profile or meter.profiles[0].name
    if name not in meter.backends:
        raise ConfigError(f"--budget-profile {name!r} is not among the profiles given: {', '.join(meter.backends)}")
    from hwprune.plan import apply_plan

    smallest = workload.uniform_plan(max(workload.space.ratios))
    model, _, _ = apply_plan(workload.model, smallest, workload.example_input, workload.calibration_batch())
    probe = Path(cfg.out_dir) / "budget-check"
    lat = meter.measure(model, probe)[name]
    shutil.rmtree(probe, ignore_errors=True)
    log(f"budget check: the smallest plan in the space measures {lat.median_ms:.3f} ms on {name}")
    if lat.median_ms > cfg.latency_budget_ms:
        raise BudgetError(
            f"latency budget {cfg.latency_budget_ms:g} ms on {name} cannot be met: the most pruned plan in search "
            f"space {workload.space.name!r} measures {lat.median_ms:.3f} ms; raise the budget or allow larger ratios"
        )


def run_search(
    workload: Workload,
    profiles: Sequence[DeviceProfile],
    cfg: SearchConfig,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run (or resume) the study until it holds ``cfg.trials`` finished trials or the timeout passes.

    KeyboardInterrupt propagates after the running trial is recorded as failed; finished trials are already in
    the storage, so nothing finished is lost.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meter = LatencyMeter(profiles, workload.model, workload.input_shape, out)
    names = objective_names(workload, profiles, cfg.macs_objective)
    study = open_study(cfg, names)
    if "objectives" not in study.user_attrs:
        study.set_user_attr("objectives", names)
        study.set_user_attr("model", workload.model_ref)
        study.set_user_attr("weights", workload.weights)
        study.set_user_attr("data", workload.data_ref)
        study.set_user_attr("search_space", workload.space.source or workload.space.name)
        study.set_user_attr("profiles", [p.source or p.name for p in profiles])
        study.set_user_attr("input_shape", list(workload.input_shape))
        study.set_user_attr("latency_budget_ms", cfg.latency_budget_ms)
        study.set_user_attr("budget_profile", cfg.budget_profile or profiles[0].name)
        study.set_user_attr("fingerprints", meter.fingerprints())
        study.set_user_attr("seed", cfg.seed)
        study.set_user_attr("reference_ms", meter.reference_ms)
    # Every worker and every resume scales its same-window ratios by the one reference latency of the study.
    stored = study.user_attrs.get("reference_ms", {})
    meter.reference_ms.update({k: v for k, v in stored.items() if k in meter.reference_ms})
    check_budget(workload, meter, cfg, log)
    screen = _lut_screen(workload, meter, cfg, study, profiles, log)
    structures = offered_structures(workload, profiles) if workload.structure_layers else []
    if workload.structure_layers:
        dropped = sorted(set(workload.space.structures.allowed) - set(structures))
        log(f"per-layer structures on {len(workload.structure_layers)} layers: {', '.join(structures) or 'none'}"
            + (f" (not offered, no target accelerates them: {', '.join(dropped)}; set explore_all to search them)"
               if dropped else ""))

    from hwprune.costs import count_macs

    dense_macs = count_macs(workload.model, workload.example_input)
    if not study.trials:
        study.enqueue_trial({PARAM_PREFIX + g.name: 0.0 for g in workload.groups}, user_attrs={"role": "dense"})

    def objective(trial: optuna.Trial) -> List[float]:
        dense = trial.user_attrs.get("role") == "dense"
        plan = workload.dense_plan() if dense else plan_from_trial(workload, trial, structures)
        trial.set_user_attr("plan", plan.to_json())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if screen is not None and not dense and not plan.structures:
            measure, predicted = screen.should_measure_plan(plan)
            if not measure:
                return _screened(trial, workload, plan, predicted, screen, names, meter, cfg, dense_macs)
        workdir = out / "trials" / f"trial-{trial.number}"
        try:
            outcome, _ = run_trial(
                workload, plan, meter, workdir, cfg.latency_budget_ms, cfg.budget_profile, seed=cfg.seed,
                evaluate_over_budget=dense,  # the baseline is always evaluated, within budget or not
            )
        except Exception as e:
            trial.set_user_attr("reason", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        finally:
            for onnx in workdir.glob("*.onnx"):  # export rebuilds from the plan; keep the run dir small
                onnx.unlink()
        trial.set_user_attr("plan", outcome.plan.to_json())  # now with the exact pruning history
        trial.set_user_attr("metrics", outcome.metrics())
        trial.set_user_attr("latency", {k: v.pair.to_dict() for k, v in outcome.latency.items()})
        trial.set_user_attr("feasible", outcome.feasible)
        trial.set_user_attr("reason", outcome.reason)
        trial.set_user_attr("has_weights", (workdir / "state_dict.pt").is_file())
        if cfg.latency_budget_ms is not None:
            bp = cfg.budget_profile or profiles[0].name
            trial.set_user_attr("constraint", [outcome.latency[bp].median_ms - cfg.latency_budget_ms])
        return _values(outcome, names, dense_macs)

    done = sum(t.state in FINISHED for t in study.trials)
    remaining = cfg.trials - done
    if remaining <= 0:
        log(f"study {cfg.study_name!r} already holds {done} finished trials (>= --trials {cfg.trials}); nothing to run")
        return study
    callbacks = [optuna.study.MaxTrialsCallback(cfg.trials, states=FINISHED)]
    bar = _Progress(remaining, names) if cfg.progress else None
    if bar is not None:
        callbacks.append(bar.callback)
    stop = _InterruptGuard()
    callbacks.append(stop.callback)
    try:
        with stop:
            study.optimize(
                objective, n_trials=remaining, timeout=cfg.timeout_s, callbacks=callbacks, catch=(Exception,),
                gc_after_trial=True,
            )
    finally:
        if bar is not None:
            bar.close()
    return study


def _lut_screen(workload: Workload, meter: LatencyMeter, cfg: SearchConfig, study: optuna.Study,
                profiles: Sequence[DeviceProfile], log: Callable[[str], None]):
    """A lookup-table screen for the budget profile, or None. Candidates predicted over the budget by more than
    the margin are recorded as infeasible without being measured or trained."""
    if cfg.lut_path is None:
        return None
    if cfg.latency_budget_ms is None:
        raise ConfigError(f"--lut {cfg.lut_path} screens against a latency budget; give --latency-budget-ms too")
    from hwprune.latency.lut import LatencyTable, LutScreen

    bp = cfg.budget_profile or profiles[0].name
    table = LatencyTable.load(cfg.lut_path, fingerprint=meter.backends[bp].fingerprint(), space=workload.space.name,
                              model=workload.model_ref)
    screen = LutScreen(table, cfg.latency_budget_ms, cfg.screen_margin, reference_ms=meter.reference_ms[bp])
    if "lut" not in study.user_attrs:
        study.set_user_attr("lut", {"path": str(cfg.lut_path), "entries": len(table.entries), "scale": table.scale,
                                    "overhead_ms": table.overhead_ms, "margin": cfg.screen_margin})
    log(f"screening with {cfg.lut_path} ({len(table.entries)} entries): candidates predicted over "
        f"{cfg.latency_budget_ms * (1 + cfg.screen_margin):g} ms on {bp} are not measured")
    return screen


def _screened(trial, workload: Workload, plan: PruningPlan, predicted: float, screen, names: Sequence[str],
              meter: LatencyMeter, cfg: SearchConfig, dense_macs: int) -> List[float]:
    """Objective values of a candidate the lookup table rules out: infeasible, predicted latency, not measured."""
    from hwprune.costs import count_macs
    from hwprune.plan import apply_plan

    bp = cfg.budget_profile or meter.profiles[0].name
    macs = dense_macs
    if "macs_kept" in names or "macs" in names:
        macs = count_macs(apply_plan(workload.model, plan, workload.example_input)[0], workload.example_input)
    reason = screen.reason(predicted)
    trial.set_user_attr("screened", True)
    trial.set_user_attr("predicted_ms", predicted)
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("constraint", [predicted - cfg.latency_budget_ms])
    metrics = {"accuracy": None, "feasible": False, "reason": reason, "macs": macs, "plan": plan.summary()}
    values = []
    for n in names:
        if n == "accuracy":
            values.append(0.0)  # never trained: the worst accuracy, as for measured over-budget trials
        elif n == "macs_kept":
            values.append(macs / dense_macs)
        elif n == "macs":
            values.append(float(macs))
        else:  # predicted on the budget profile; other profiles scaled by their reference latencies
            p = n.split(":", 1)[1]
            values.append(predicted * meter.reference_ms[p] / meter.reference_ms[bp])
            metrics[n] = values[-1]
    trial.set_user_attr("metrics", metrics)
    return values


class _InterruptGuard:
    """Makes Ctrl-C reliable. Python delivers KeyboardInterrupt wherever the interpreter happens to be; inside a
    garbage-collection callback it is printed and swallowed, and the search would go on. The guard remembers the
    signal: the running trial is still interrupted at once where possible, and otherwise the study stops after
    the trial in progress, and KeyboardInterrupt is raised when optimize returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True
        raise KeyboardInterrupt

    def callback(self, study: optuna.Study, trial) -> None:
        if self.requested:
            study.stop()

    def __enter__(self):
        # Only where Python's own Ctrl-C handling is active (not when SIGINT is ignored, e.g. under nohup).
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and exc_type is None:
            raise KeyboardInterrupt
        return False


class _Progress:
    """A tqdm bar over trials with the latest and best figures."""

    def __init__(self, total: int, names: Sequence[str]):
        from tqdm.auto import tqdm

        self.names = names
        self.bar = tqdm(total=total, unit="trial", desc="search", dynamic_ncols=True)

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        info = {"state": trial.state.name.lower()}
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.values:
            if not trial.user_attrs.get("feasible", True):
                info["state"] = "over budget"
            for n, v in zip(self.names, trial.values):
                short = n.replace("latency_ms:", "ms:")
                info[short] = f"{v:.4g}"
        self.bar.set_postfix(info, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

