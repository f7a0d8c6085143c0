"""The search: an ordinary multi-objective Optuna study over per-group pruning ratios.

Objectives: validation accuracy (up) -- or, chosen instead (``--objective``), a fidelity to the dense model on
held-out inputs (agreement, cosine, or exp(-KL): hwprune.fidelity), up -- and measured latency per device profile
(down), optionally MACs (down).
Without data (latency-only work) the accuracy objective is replaced by the MACs a plan keeps (up), so the front
holds, for each latency, the plan that keeps the most compute. The latency budget is an Optuna constraint; a trial
over budget ends before any training and is recorded as infeasible. Trial 0 is the dense model with the same
recovery budget as every candidate.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import threading
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import optuna

from hwprune import storage as shared
from hwprune.errors import BudgetError, ConfigError, RunError
from hwprune.fidelity import OBJECTIVE_COLUMN, WORST
from hwprune.inputs import InputSpec
from hwprune.latency import DeviceProfile
from hwprune.plan import PruningPlan
from hwprune.trial import LatencyMeter, TrialOutcome, run_trial
from hwprune.workload import Workload

SAMPLERS = ("nsga2", "tpe", "gp", "random")
PARAM_PREFIX = "ratio:"
FINISHED = shared.FINISHED


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
    allow_changed_config: bool = False  # resume although the search space or a profile file changed
    heartbeat_s: int = shared.HEARTBEAT_S  # a running trial beats this often (RDB: Optuna's heartbeat)
    grace_s: int = shared.GRACE_S  # a running trial silent this long belongs to a dead worker: failed, run again
    allow_device_change: bool = False  # resume / join a study measured on a device with another fingerprint
    warm_start: bool = True  # enqueue the uniform sweep and the global-magnitude plan as the first trials
    proposals: bool = False  # enqueue greedy plans from measured per-group sensitivity and latency saved
    screen_fidelity: bool = False  # train only candidates whose cheap score could reach the front (fidelity_screen)
    screen_fidelity_margin: float = 0.01  # in the objective's units
    # a constraint for the sampler: a candidate whose quality objective falls more than this below the dense
    # trial's (objective units: 0.05 = 5 pp of accuracy) is infeasible, so the sampler spends its trials where a
    # user would pick a model; such trials stay in trials.csv (and on the front, if Pareto-optimal)
    max_drop: Optional[float] = None


def objective_names(workload: Workload, profiles: Sequence[DeviceProfile], macs_objective: bool) -> List[str]:
    names = [OBJECTIVE_COLUMN[workload.objective] if workload.data is not None else "macs_kept"]
    names += [f"latency_ms:{p.name}" for p in profiles]
    if macs_objective and workload.data is not None:
        names.append("macs")
    return names


def directions(names: Sequence[str]) -> List[str]:
    return ["maximize" if n in WORST or n == "macs_kept" else "minimize" for n in names]


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


def quality_violation(study: optuna.Study, value: float, max_drop: float, dense: bool = False) -> float:
    """How far ``value`` (the quality objective, maximized) falls below the dense trial's minus ``max_drop``
    (> 0: infeasible). 0 for the dense trial itself, and while no dense trial has finished (another worker's)."""
    if dense:
        return 0.0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("role") == "dense" and t.values:
            return float(t.values[0] - max_drop - value)
    return 0.0


def constraint_values(cfg: SearchConfig, latency_ms: Optional[float], quality_gap: float = 0.0) -> List[float]:
    """A trial's constraint vector, one layout for every trial of a study: [latency - budget] with a budget,
    [quality_violation] with --max-drop (0 where it cannot be violated, e.g. a candidate screened out untrained)."""
    out = []
    if cfg.latency_budget_ms is not None:
        out.append(latency_ms - cfg.latency_budget_ms)
    if cfg.max_drop is not None:
        out.append(quality_gap)
    return out


def _constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraint", [0.0])


def open_study(cfg: SearchConfig, names: Sequence[str], load_only: bool = False,
               setup: Optional[Callable[[optuna.Study], None]] = None) -> optuna.Study:
    """Create or load the study. Storage creation (the schema of a fresh database) and ``setup`` (the study's
    one-time attributes, the dense baseline) run under the storage's lock, so workers started together are safe."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = shared.storage_url(cfg.storage, cfg.out_dir)
    with shared.study_lock(url):
        storage = shared.open_storage(url, cfg.heartbeat_s, cfg.grace_s)
        if load_only:
            try:
                return optuna.load_study(study_name=cfg.study_name, storage=storage)
            except KeyError as e:
                raise RunError(f"no study {cfg.study_name!r} in {cfg.storage or cfg.out_dir}; check --study") from e
        sampler = make_sampler(cfg.sampler, cfg.seed, cfg.trials,
                               cfg.latency_budget_ms is not None or cfg.max_drop is not None)
        study = optuna.create_study(
            study_name=cfg.study_name, storage=storage, sampler=sampler, directions=directions(names),
            load_if_exists=True,
        )
        stored = study.user_attrs.get("objectives")
        if stored and names and stored[0] != names[0]:
            objective = {col: obj for obj, col in OBJECTIVE_COLUMN.items()}
            was, now = (objective.get(n, n) for n in (stored[0], names[0]))
            raise RunError(
                f"study {cfg.study_name!r} optimises {was!r}, not {now!r}; resume it with the same --objective "
                f"(and data), or use another --study name or --out"
            )
        if stored is not None and list(stored) != list(names):
            raise RunError(
                f"study {cfg.study_name!r} was created with objectives {stored}, not {list(names)}; use another "
                f"--study name or the same profiles and data"
            )
        if setup is not None:
            shared.fail_dead_trials(study, cfg.grace_s)  # before the baseline check: a lost baseline is requeued
            setup(study)
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


REALIZED, SAME_AS = "realized", shared.SAME_AS
STRUCTURES_ENQUEUED = "structures_enqueued"  # an enqueued trial that fixed every layer-structure parameter too


def earlier_same_model(study: optuna.Study, key: str, number: int) -> Optional[int]:
    """The first completed trial (other than ``number``, and not itself a repeat) whose plan built the model
    ``key`` names (PruningPlan.realized_key), or None."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number != number and t.user_attrs.get(REALIZED) == key and t.user_attrs.get(SAME_AS) is None:
            return t.number
    return None


def reuse_results(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> List[float]:
    """A trial whose plan built the same model as an earlier one: the sampler is told the earlier trial's values
    (they are what these parameters give), the trial is marked a repeat (kept off the front and out of the
    trial count, see ``storage.done_count``), and nothing is measured or trained again."""
    earlier = next(t for t in study.get_trials(deepcopy=False) if t.number == outcome.same_as)
    for key in ("metrics", "latency", "constraint", "cheap_score"):
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    trial.set_user_attr(SAME_AS, outcome.same_as)
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("reason", outcome.reason)
    trial.set_user_attr("has_weights", False)
    return list(earlier.values)


def _values(outcome: TrialOutcome, names: Sequence[str], dense_macs: int) -> List[float]:
    vals = []
    for n in names:
        if n in WORST:
            # An infeasible trial is never trained; the objective's worst value keeps the sampler informed.
            vals.append(outcome.score if outcome.score is not None else WORST[n])
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
    smallest = workload.uniform_plan(max(workload.space.ratios))
    model, _, _ = workload.apply(smallest)
    probe = Path(cfg.out_dir) / "budget-check"
    lat = meter.measure(model, probe)[name]
    shutil.rmtree(probe, ignore_errors=True)
    log(f"budget check: the smallest plan in the space measures {lat.median_ms:.3f} ms on {name}")
    if lat.median_ms > cfg.latency_budget_ms:
        raise BudgetError(
            f"latency budget {cfg.latency_budget_ms:g} ms on {name} cannot be met: the most pruned plan in search "
            f"space {workload.space.name!r} measures {lat.median_ms:.3f} ms; raise the budget or allow larger ratios"
        )


def check_same_device(study: optuna.Study, meter: LatencyMeter, allow: bool, log: Callable[[str], None]) -> None:
    """A study's latencies are comparable only when every worker and every resume measures on the same device
    and software (CPU, cores, library versions, profile options). Refuse to mix them unless told to."""
    from hwprune.latency.measure import fingerprint_hash

    stored = study.user_attrs.get("fingerprints") or {}
    for name, fp in meter.fingerprints().items():
        old = stored.get(name)
        if old is None or fingerprint_hash(old) == fingerprint_hash(fp):
            continue
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {fp.get(k)!r}" for k in diff[:3])
        if not allow:
            raise RunError(
                f"study {study.study_name!r} was measured on profile {name!r} with another device or software "
                f"({detail}); its latencies would not be comparable. Use a new --study/--out, or pass "
                f"--allow-device-change to mix them anyway")
        log(f"warning: profile {name!r} differs from the study's device ({detail}); mixing as asked")


def use_study_reference(study: optuna.Study, meter: LatencyMeter, log: Callable[[str], None]) -> None:
    """Every worker and every resume scales its same-window ratios by the study's one reference latency (timed
    alone when the study was created), so figures from all of them are on one scale. This worker's own reading
    of the reference is compared with it: a large difference says the machine changed speed."""
    from hwprune.latency import LatencyStats

    stored = study.user_attrs.get("reference") or {}
    for name, d in stored.items():
        if name not in meter.reference_stats:
            continue
        ref = LatencyStats.from_dict(d)
        now = meter.reference_stats[name].median_ms
        if ref.median_ms > 0 and abs(now / ref.median_ms - 1) > 0.10:
            log(f"note: the dense model times {now:.3f} ms on {name} now vs {ref.median_ms:.3f} ms when the study "
                f"began ({100 * (now / ref.median_ms - 1):+.0f}%); reported latencies stay on the study's scale "
                f"(ratios are measured in the same window, so they are unaffected)")
        meter.reference_stats[name] = ref
        meter.reference_ms[name] = ref.median_ms


def run_search(
    workload: Workload,
    profiles: Sequence[DeviceProfile],
    cfg: SearchConfig,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run (or resume) the study until it holds ``cfg.trials`` finished trials or the timeout passes; several
    workers may run it together on one storage. SIGINT/SIGTERM raise SearchInterrupted after the running trial;
    finished trials are already in the storage, so nothing finished is lost."""
    check_search_config(cfg)
    if cfg.max_drop is not None and workload.data is None:
        raise ConfigError(f"--max-drop {cfg.max_drop:g} bounds the loss of the quality objective, but this search has "
                          f"none (latency only); give --data (or drop --max-drop)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workload = workload.for_profiles(profiles)  # channel counts the targets need (profile channel_multiple)
    meter = LatencyMeter(profiles, workload.model, workload.inputs, out)
    try:
        return _run_search(workload, profiles, cfg, meter, log)
    finally:
        meter.close()


def _run_search(workload: Workload, profiles: Sequence[DeviceProfile], cfg: SearchConfig, meter: LatencyMeter,
                log: Callable[[str], None]) -> optuna.Study:
    out = Path(cfg.out_dir)
    from hwprune.verify import save_profiles

    save_profiles(out, profiles)
    names = objective_names(workload, profiles, cfg.macs_objective)
    study = open_study(cfg, names, setup=lambda st: _setup_study(st, workload, profiles, meter, cfg, names, log))
    check_same_device(study, meter, cfg.allow_device_change, log)
    use_study_reference(study, meter, log)
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
    if cfg.proposals:
        from hwprune.proposals import enqueue_proposals

        used = 1 + len(study.user_attrs.get("warm_start") or [])
        enqueue_proposals(study, workload, meter, cfg.budget_profile or profiles[0].name, out, cfg.trials - used,
                          cfg.seed, log, offered=structures)

    fscreen = None
    if cfg.screen_fidelity and workload.data is not None:
        from hwprune.fidelity_screen import FidelityScreen

        fscreen = FidelityScreen(study, OBJECTIVE_COLUMN[workload.objective], cfg.screen_fidelity_margin)

    def objective(trial: optuna.Trial) -> List[float]:
        dense = trial.user_attrs.get("role") == "dense"
        # a baseline or a proposal is a channel plan by definition: its layer structures stay off (unfixed by the
        # enqueued parameters, the sampler would otherwise draw them, e.g. drop random blocks of a "uniform" plan),
        # unless it enqueued every structure parameter itself (a proposal that drops blocks)
        fixed = ((trial.user_attrs.get("baseline") is not None or trial.user_attrs.get("proposal") is not None)
                 and not trial.user_attrs.get(STRUCTURES_ENQUEUED))
        plan = workload.dense_plan() if dense else plan_from_trial(workload, trial, () if fixed else structures)
        trial.set_user_attr("plan", plan.to_json())
        if screen is not None and not dense and not plan.structures:
            measure, predicted = screen.should_measure_plan(plan)
            if not measure:
                return _screened(trial, workload, plan, predicted, screen, names, meter, cfg, dense_macs)
        workdir = out / "trials" / f"trial-{trial.number}"
        same = None if dense else (lambda key: earlier_same_model(study, key, trial.number))
        try:
            outcome, _ = run_trial(
                workload, plan, meter, workdir, cfg.latency_budget_ms, cfg.budget_profile, seed=cfg.seed,
                evaluate_over_budget=dense,  # the baseline is always evaluated, within budget or not
                # the dense trial records its cheap score too, and is never screened
                screen=None if fscreen is None else (lambda cheap, lat: None) if dense else fscreen.reason,
                same_model=same,
            )
        except Exception as e:
            trial.set_user_attr("reason", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        finally:
            for onnx in workdir.glob("*.onnx"):  # export rebuilds from the plan; keep the run dir small
                onnx.unlink()
        trial.set_user_attr("plan", outcome.plan.to_json())  # now with the exact pruning history
        trial.set_user_attr(REALIZED, outcome.realized)
        if outcome.same_as is not None:
            return reuse_results(study, trial, outcome)
        trial.set_user_attr("metrics", outcome.metrics())
        trial.set_user_attr("latency", {k: v.pair.to_dict() for k, v in outcome.latency.items()})
        trial.set_user_attr("feasible", outcome.feasible)
        trial.set_user_attr("reason", outcome.reason)
        trial.set_user_attr("has_weights", (workdir / "state_dict.pt").is_file())
        if outcome.cheap_score is not None:
            trial.set_user_attr("cheap_score", outcome.cheap_score)
        if outcome.screened:
            trial.set_user_attr("screened", True)
            trial.set_user_attr("cheap_screened", True)
        values = _values(outcome, names, dense_macs)
        gap = quality_violation(study, values[0], cfg.max_drop, dense) if cfg.max_drop is not None else 0.0
        latency_ms = (outcome.latency[cfg.budget_profile or profiles[0].name].median_ms
                      if cfg.latency_budget_ms is not None else None)
        constraint = constraint_values(cfg, latency_ms, gap)
        if constraint:
            trial.set_user_attr("constraint", constraint)
        return values

    done = shared.done_count(study, free_repeats=cfg.trials)
    remaining = cfg.trials - done
    if remaining <= 0:
        log(f"study {cfg.study_name!r} already holds {done} finished trials (>= --trials {cfg.trials}); nothing to run")
        return study
    bar = _Progress(remaining, names) if cfg.progress else None
    try:
        run_worker(study, objective, cfg, callbacks=[bar.callback] if bar else [], log=log)
    finally:
        if bar is not None:
            bar.close()
    if fscreen is not None:
        from hwprune.fidelity_screen import summary as screen_summary

        s = screen_summary(study, fscreen.objective_name)
        study.set_user_attr("fidelity_screen", s)
        tau = "undefined" if s["kendall_tau"] is None else f"{s['kendall_tau']:.2f}"
        log(f"cheap-fidelity screening: {s['screened']} candidates not trained; rank agreement of cheap and full "
            f"scores Kendall tau {tau} over {s['pairs']} trained trials"
            + ("; too low, so screening fell back to training every candidate" if s["fell_back"] else ""))
    return study


# ------------------------------------------------------------------------------------- study setup, workers

def check_search_config(cfg: SearchConfig) -> None:
    """What the CLI's argument types check, for callers of the Python API too (before any work is done)."""
    import math

    if not isinstance(cfg.trials, int) or cfg.trials < 1:
        raise ConfigError(f"trials {cfg.trials!r} must be a whole number of at least 1 (finished trials wanted)")
    for name, value in (("timeout_s", cfg.timeout_s), ("latency_budget_ms", cfg.latency_budget_ms),
                        ("max_drop", cfg.max_drop)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} {value!r} must be a positive finite number")
    if not (math.isfinite(cfg.screen_margin) and cfg.screen_margin >= 0):
        raise ConfigError(f"screen_margin {cfg.screen_margin!r} must be a finite number >= 0")
    if not (math.isfinite(cfg.screen_fidelity_margin) and cfg.screen_fidelity_margin >= 0):
        raise ConfigError(f"--screen-fidelity-margin {cfg.screen_fidelity_margin!r} must be a finite number >= 0 "
                          f"(in the objective's units, e.g. 0.01)")
    if cfg.heartbeat_s < 1 or cfg.grace_s < 2 * cfg.heartbeat_s:
        raise ConfigError(f"grace {cfg.grace_s} s must be at least twice the heartbeat {cfg.heartbeat_s} s (>= 1 s), "
                          f"or live trials would be taken for dead ones; raise --grace")


def _check_same_inputs(attrs: Dict[str, Any], workload: Workload) -> None:
    """A resume must feed the model what the study measured: other --inputs are refused in one line."""
    if "inputs" not in attrs:  # a study from before input specs: one image input
        return
    now = None if workload.inputs.is_image else workload.inputs.to_dict()
    if attrs["inputs"] != now:
        was = "the one image input" if attrs["inputs"] is None else InputSpec.from_dict(attrs["inputs"]).to_text()
        raise ConfigError(f"the study was created with inputs {was}, not {workload.inputs.to_text()}; resume with "
                          f"the same --inputs or start a new --study")


def _setup_study(study: optuna.Study, workload: Workload, profiles: Sequence[DeviceProfile], meter: LatencyMeter,
                 cfg: SearchConfig, names: Sequence[str], log: Callable[[str], None] = print) -> None:
    """Once per study, under the storage lock: what the study was made of (files as content), and the dense
    baseline. On resume, a search space or profile that changed since is refused (provenance.check_unchanged)."""
    from hwprune import provenance

    files = provenance.records(workload.space, profiles)
    if "objectives" in study.user_attrs:
        for line in provenance.check_unchanged(study.user_attrs, files, cfg.allow_changed_config):
            log(f"warning: resuming with a changed {line} ({provenance.OVERRIDE_FLAG})")
        _check_same_inputs(study.user_attrs, workload)
    else:
        for key, value in files.items():
            study.set_user_attr(key, value)
        study.set_user_attr("image_size", workload.image_size)
        study.set_user_attr("objectives", names)
        study.set_user_attr("objective", workload.objective)
        study.set_user_attr("model", workload.model_ref)
        study.set_user_attr("weights", workload.weights)
        study.set_user_attr("data", workload.data_ref)
        study.set_user_attr("search_space", workload.space.source or workload.space.name)
        study.set_user_attr("profiles", [p.source or p.name for p in profiles])
        study.set_user_attr("input_shape", list(workload.input_shape))
        # named (token) inputs with their sequence length, so that export / verify / resume rebuild alike
        study.set_user_attr("inputs", None if workload.inputs.is_image else workload.inputs.to_dict())
        study.set_user_attr("sequence_length", workload.sequence_length)
        study.set_user_attr("latency_budget_ms", cfg.latency_budget_ms)
        study.set_user_attr("max_drop", cfg.max_drop)
        study.set_user_attr("budget_profile", cfg.budget_profile or profiles[0].name)
        study.set_user_attr("fingerprints", meter.fingerprints())
        study.set_user_attr("seed", cfg.seed)
        study.set_user_attr("reference_ms", meter.reference_ms)
        study.set_user_attr("reference", {k: v.to_dict() for k, v in meter.reference_stats.items()})
        _name_metrics(study, names)
    ensure_dense_trial(study, workload)
    if cfg.warm_start:  # under the setup lock, like the dense trial: queued exactly once per study
        from hwprune.baselines import enqueue_warm_start

        enqueue_warm_start(study, workload, cfg.trials - 1, log)


def ensure_dense_trial(study: optuna.Study, workload: Workload) -> None:
    """Queue the dense baseline unless one is queued, running or complete (checked and queued under the
    storage lock, so N workers starting together queue it once; a lost baseline is queued again)."""
    live = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
    if not any(t.user_attrs.get("role") == "dense" for t in study.get_trials(deepcopy=False, states=live)):
        study.enqueue_trial({PARAM_PREFIX + g.name: 0.0 for g in workload.groups}, user_attrs={"role": "dense"})


class SearchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the search; finished trials are in the storage. ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def claim_trial(study: optuna.Study, url: str, target: int, grace_s: float,
                log: Callable[[str], None]) -> Optional[optuna.Trial]:
    """The next trial for this worker, or None once finished + running trials reach ``target``. Under the
    storage lock, so several workers together run exactly ``target`` trials; trials of dead workers are failed
    and queued again first, and a queued trial (the baseline, a retry) is taken before a new one."""
    with shared.study_lock(url):
        shared.fail_dead_trials(study, grace_s, log)
        running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if shared.done_count(study, free_repeats=target) + running >= target:
            return None
        with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for optimize(); ours beat here
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        trial.set_user_attr(shared.WORKER, shared.worker_id())
        return trial


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], List[float]], cfg: SearchConfig,
               callbacks: Sequence[Callable] = (), log: Callable[[str], None] = print) -> None:
    """Claim and run trials until the study holds ``cfg.trials`` finished trials, the timeout passes, or a
    signal asks to stop (then the running trial finishes first; a second signal stops it at once and queues it
    again). Raises SearchInterrupted after a signal."""
    url = shared.storage_url(cfg.storage, cfg.out_dir)
    deadline = None if cfg.timeout_s is None else time.monotonic() + cfg.timeout_s
    with _StopSignals(log) as stop:
        while not stop.signum and (deadline is None or time.monotonic() < deadline):
            trial = claim_trial(study, url, cfg.trials, cfg.grace_s, log)
            if trial is None:
                break
            frozen = _run_trial(study, trial, objective, cfg, stop, log)
            for cb in callbacks:
                cb(study, frozen)
    if stop.signum:
        raise SearchInterrupted(stop.signum)


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective, cfg: SearchConfig, stop: "_StopSignals",
               log: Callable[[str], None]) -> optuna.trial.FrozenTrial:
    """One trial with a heartbeat; an exception fails it (reason kept) and the search goes on."""
    with shared.Heartbeat(study, trial, cfg.heartbeat_s):
        try:
            with stop.interruptible():
                values = objective(trial)
        except optuna.TrialPruned:
            return study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except KeyboardInterrupt:  # a second signal: stop now, run this trial again on resume
            frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
            with shared.study_lock(shared.storage_url(cfg.storage, cfg.out_dir)):
                shared.requeue(study, frozen)
            raise SearchInterrupted(stop.signum or signal.SIGINT)
        except Exception as e:
            if "reason" not in trial.user_attrs:
                trial.set_user_attr("reason", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"trial {trial.number} failed: {trial.user_attrs.get('reason')}")
            return _tell(study, trial, log, state=optuna.trial.TrialState.FAIL)
        finally:
            gc.collect()
        return _tell(study, trial, log, values=values)


def _tell(study: optuna.Study, trial: optuna.Trial, log: Callable[[str], None], **result) -> optuna.trial.FrozenTrial:
    """Record the result, unless another worker already failed this trial as a dead worker's (this one stalled
    past the grace period): then its retry is queued and this result is dropped, so it is not counted twice."""
    frozen = study.tell(trial, skip_if_finished=True, **result)
    wanted = result.get("state") or optuna.trial.TrialState.COMPLETE
    if frozen.state != wanted and frozen.state == optuna.trial.TrialState.FAIL and "reason" not in frozen.user_attrs:
        log(f"trial {trial.number} was failed by another worker (no heartbeat within --grace); its retry runs it")
    return frozen


def _name_metrics(study: optuna.Study, names: Sequence[str]) -> None:
    """Objective names in the study itself, so optuna-dashboard labels its axes."""
    with warnings.catch_warnings():  # experimental in Optuna 3.x-5.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(names))


def _lut_screen(workload: Workload, meter: LatencyMeter, cfg: SearchConfig, study: optuna.Study,
                profiles: Sequence[DeviceProfile], log: Callable[[str], None]):
    """A lookup-table screen for the budget profile, or None. Candidates predicted over the budget by more than
    the margin are recorded as infeasible without being measured or trained."""
    if cfg.lut_path is None:
        return None
    if cfg.latency_budget_ms is None:
        raise ConfigError(f"--lut {cfg.lut_path} screens against a latency budget; give --latency-budget-ms too")
    from hwprune.latency.lut import LatencyTable, LutScreen
    from hwprune.latency.lut.build import check_image_inputs

    check_image_inputs(workload, "--lut")

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

    bp = cfg.budget_profile or meter.profiles[0].name
    macs = dense_macs
    if "macs_kept" in names or "macs" in names:
        macs = count_macs(workload.apply(plan)[0], workload.example_input)
    reason = screen.reason(predicted)
    trial.set_user_attr("screened", True)
    trial.set_user_attr("predicted_ms", predicted)
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("constraint", constraint_values(cfg, predicted))
    metrics = {OBJECTIVE_COLUMN[workload.objective]: None, "feasible": False, "reason": reason, "macs": macs, "plan": plan.summary()}
    values = []
    for n in names:
        if n in WORST:
            values.append(WORST[n])  # never trained: the worst value, as for measured over-budget trials
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


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM stop the search after the running trial; a second signal stops the trial
    itself (it is failed and queued again). Python delivers KeyboardInterrupt wherever the interpreter happens to
    be (inside a garbage-collection callback it is printed and swallowed), so the first signal only sets a flag."""

    def __init__(self, log: Callable[[str], None]):
        self.signum = 0
        self.log = log
        self._previous: Dict[int, object] = {}
        self._in_trial = False

    def _handler(self, signum, frame):
        if self.signum and self._in_trial:
            raise KeyboardInterrupt
        self.signum = signum
        if self._in_trial:
            self.log(f"{signal.Signals(signum).name}: stopping after the running trial (send it again to stop now)")

    @contextlib.contextmanager
    def interruptible(self):
        self._in_trial = True
        try:
            yield
        finally:
            self._in_trial = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # SIGINT only where Python's own Ctrl-C handling is active (not when ignored, e.g. under nohup).
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handler)
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
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
            if trial.user_attrs.get(SAME_AS) is not None:
                info["state"] = f"repeat of {trial.user_attrs[SAME_AS]}"
            elif not trial.user_attrs.get("feasible", True):
                info["state"] = "over budget"
            for n, v in zip(self.names, trial.values):
                short = n.replace("latency_ms:", "ms:")
                info[short] = f"{v:.4g}"
        self.bar.set_postfix(info, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

