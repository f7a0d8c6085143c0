"""Building a latency table: measure every op configuration a search space can produce as a standalone module on
a device profile, then measure whole models to calibrate the sum of entries."""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from hwprune.errors import ConfigError, ModelError
from hwprune.latency.base import DeviceProfile, LatencyBackend, MeasureSettings, make_backend, measure_candidate
from hwprune.latency.lut.coverage import MAX_COMBINATIONS, find_dependencies, layer_configs, prune
from hwprune.latency.lut.stats import fit_calibration
from hwprune.latency.lut.table import LatencyTable
from hwprune.latency.lut.trace import LayerCall, split_key, trace_layers

Progress = Union[bool, Callable[[int, int, str], None]]


def _backend_and_profile(profile_or_backend, settings: Optional[MeasureSettings]):
    if isinstance(profile_or_backend, DeviceProfile):
        profile = profile_or_backend
        if settings is not None:
            profile = dataclasses.replace(profile, measure=settings)
        return make_backend(profile), profile
    backend = profile_or_backend
    if settings is not None:
        raise ConfigError("measure settings can be overridden only when a DeviceProfile is given, not a backend")
    return backend, getattr(backend, "profile", None)


def _progress_fn(progress: Progress, total: int, desc: str):
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda done, total, what: None), lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="op", dynamic_ncols=True)

    def step(done: int, total: int, what: str) -> None:
        bar.n = done
        bar.set_postfix_str(what[:40], refresh=False)
        bar.refresh()

    return step, bar.close


def check_image_inputs(workload, flag: str) -> None:
    """Tables replay layers on one image tensor; a model with named (token) inputs is timed whole instead."""
    inputs = getattr(workload, "inputs", None)
    if inputs is not None and not inputs.is_image:
        raise ModelError(f"{flag}: latency lookup tables time layers of image models; this model takes "
                         f"{inputs.to_text()} (token inputs), so measure it whole: drop {flag}")


def build_lut(
    workload,
    profile_or_backend: Union[DeviceProfile, LatencyBackend],
    ratios: Optional[Sequence[float]] = None,
    progress: Progress = True,
    *,
    calibrate: int = 3,
    calibration_random: int = 3,
    calibration_rounds: int = 2,
    passes: int = 1,
    settings: Optional[MeasureSettings] = None,
    batch_size: Optional[int] = None,
    workdir: Optional[Union[str, Path]] = None,
    log: Callable[[str], None] = lambda s: None,
    max_combinations: int = MAX_COMBINATIONS,
) -> LatencyTable:
    """Measure every conv / linear op configuration ``workload``'s search space can produce on a device profile
    (or a backend object with ``fingerprint()`` and ``measure_onnx(path, shape)``), and calibrate the overhead.

    ``ratios``: the ratio choices (default: the search space's). Calibration measures whole models to fit
    ``measured = scale * sum(entries) + overhead``: ``calibrate`` uniform plans spread over the ratios (the first
    is the dense model) and ``calibration_random`` random plans (an independent ratio per group, seeded), each
    ``calibration_rounds`` times round-robin (lowest median kept); with the dense model alone the scale is 1.
    ``passes``: how many times every entry is measured (lowest median kept; more passes resist interference on a
    shared machine). ``settings`` overrides the profile's measure settings for the table's entries (not for the
    calibration). ``progress``: True for a bar, False for none, or ``fn(done, total, what)``.
    """
    check_image_inputs(workload, "--build-lut")
    t0 = time.perf_counter()
    ratios = sorted(set(float(r) for r in (workload.space.ratios if ratios is None else ratios)) | {0.0})
    backend, profile = _backend_and_profile(profile_or_backend, settings)
    whole_backend = backend if settings is None else make_backend(profile_or_backend)
    batch = int(batch_size or (profile.batch_size if profile is not None else 1))
    calls = trace_layers(workload.model, workload.input_shape)
    log(f"latency table: {len(calls)} conv/linear calls, {len(workload.groups)} groups; finding channel dependencies")
    deps = find_dependencies(workload, ratios, log)
    configs = layer_configs(deps, calls, max_combinations)
    log(f"latency table: {len(configs)} distinct op configurations to measure")

    step, close = _progress_fn(progress, len(configs), f"LUT {getattr(profile, 'name', 'backend')}")
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    try:
        entries, spread = _measure_entries(backend, configs, batch, Path(tmp.name), passes, step)
        close()
        points = _calibrate(workload, whole_backend, entries, ratios, batch, Path(tmp.name), calibrate,
                            calibration_random, calibration_rounds, log)
    finally:
        tmp.cleanup()

    scale, overhead = fit_calibration(points)
    fp = backend.fingerprint()
    return LatencyTable(
        entries=entries,
        layers=list(calls),
        ins=deps.ins,
        outs=deps.outs,
        removed=deps.removed,
        round_to=workload.round_to,
        rounding_verified=deps.rounding_verified,
        channels={g.name: g.channels for g in workload.groups},
        ratios=ratios,
        input_shape=tuple(workload.input_shape),
        batch_size=batch,
        fingerprint=fp,
        profile=getattr(profile, "name", getattr(backend, "name", "backend")),
        space=workload.space.name,
        model=workload.model_ref,
        overhead_ms=overhead,
        scale=scale,
        dense_ms=points[0]["measured_ms"],
        calibration=points,
        spread=spread,
        build_seconds=time.perf_counter() - t0,
    )


def _measure_entries(backend, configs: Dict[str, LayerCall], batch: int, workdir: Path, passes: int,
                     step: Callable[[int, int, str], None]) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """Median ms of every op configuration measured alone (the lowest median over ``passes``: interference from
    other processes only ever adds time), and the first pass's [p10_ms, p90_ms, n]."""
    from hwprune.export import to_onnx

    def measure(key: str, call: LayerCall):
        _, i, o, g = split_key(key)
        module = call.module(i, o, g)
        shape = call.input_shape(batch, i)
        path = to_onnx(module, shape, workdir / "op.onnx")
        return measure_candidate(backend, str(path), module, shape)

    entries: Dict[str, float] = {}
    spread: Dict[str, List[float]] = {}
    for n, (key, call) in enumerate(sorted(configs.items())):
        st = measure(key, call)
        entries[key] = st.median_ms
        spread[key] = [st.p10_ms, st.p90_ms, st.n]
        _, i, o, _ = split_key(key)
        step(n + 1, len(configs), f"{call.op} {i}->{o}")
    for _ in range(max(1, passes) - 1):
        for key, call in sorted(configs.items()):
            entries[key] = min(entries[key], measure(key, call).median_ms)
    return entries, spread


def _calibrate(workload, backend, entries: Dict[str, float], ratios: Sequence[float], batch: int, workdir: Path,
               uniform: int, random: int, rounds: int, log: Callable[[str], None]) -> List[Dict[str, float]]:
    """The dense model, uniform plans and random plans (what a search samples) measured whole, round-robin,
    ``rounds`` times, the lowest median of each kept: {"plan", "table_sum_ms", "measured_ms"} per model."""
    from hwprune.export import to_onnx

    shape = (batch, *workload.input_shape)
    whole = []
    for j, (label, plan_ratios) in enumerate(_calibration_plans(workload, ratios, uniform, random)):
        model = workload.model if not any(plan_ratios.values()) else prune(workload, plan_ratios)
        path = to_onnx(model, shape, workdir / f"whole-{j}.onnx")
        table_sum = sum(entries[c.key()] for c in trace_layers(model, workload.input_shape))
        whole.append((label, model, path, table_sum))
    best = [math.inf] * len(whole)
    for _ in range(max(1, rounds)):
        for j, (_, model, path, _) in enumerate(whole):
            best[j] = min(best[j], measure_candidate(backend, str(path), model, shape).median_ms)
    points = []
    for (label, _, _, table_sum), measured in zip(whole, best):
        points.append({"plan": label, "table_sum_ms": table_sum, "measured_ms": measured})
        log(f"latency table: {label}: measured {measured:.3f} ms, layer sum {table_sum:.3f} ms")
    return points


def _spread_picks(ratios: Sequence[float], k: int) -> List[float]:
    if k <= 1 or len(ratios) == 1:
        return [0.0]
    idx = sorted({round(j * (len(ratios) - 1) / (k - 1)) for j in range(k)})
    return [ratios[j] for j in idx]


def _calibration_plans(
    workload, ratios: Sequence[float], uniform: int, random: int
) -> List[Tuple[str, Dict[str, float]]]:
    """The dense model first, then ``uniform`` - 1 more uniform plans spread over the ratios, then ``random``
    plans with an independent ratio per group (seeded: the same table is rebuilt the same way)."""
    plans = [(f"uniform {r:g}", {g.name: r for g in workload.groups}) for r in _spread_picks(ratios, max(1, uniform))]
    rng = np.random.default_rng(7919)  # a fixed stream of its own (benchmarks draw test plans from others)
    for k in range(max(0, random)):
        plans.append((f"random {k + 1}", {g.name: float(rng.choice(ratios)) for g in workload.groups}))
    return plans
