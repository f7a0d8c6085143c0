"""Ground truth for a run's latency figures: the dense model and every exported Pareto model, each timed ALONE in a
fresh process with the profile's settings (what a deployed model sees), over several rounds in rotating order,
compared with the speedups the search reported.

    hwprune verify --run RUN_DIR [--profile P] [--rounds 3] [--tolerance 0.05]

Writes ``RUN_DIR/verify.csv`` (one row per profile and model), adds ``isolated_speedup:P``, ``isolated_ms:P`` and
``verify_error:P`` to ``pareto.csv`` and each model's ``metrics.json``, draws ``verify.png`` (reported vs alone),
and returns the rows; the CLI exits 2
when any relative error exceeds the tolerance.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from hwprune.errors import RunError
from hwprune.atomic import write_text as write_text_atomic
from hwprune.latency.base import DeviceProfile

PROFILES_FILE = "profiles.json"


@dataclass
class VerifyRow:
    profile: str
    trial: int
    reported_speedup: float  # 1 / the in-search same-window ratio to the dense model
    isolated_speedup: float  # median over rounds of (dense alone / model alone), each in a fresh process
    isolated_min: float  # spread of the per-round isolated speedups
    isolated_max: float
    rel_error: float  # reported / isolated - 1
    model_ms: float  # median over rounds of the model's own median, alone
    dense_ms: float
    rounds: int

    @property
    def spread(self) -> float:
        """Half the relative width of the isolated speedup's range over rounds: the ground truth's own noise."""
        return (self.isolated_max - self.isolated_min) / 2.0 / self.isolated_speedup if self.isolated_speedup else 0.0

    @property
    def inside_alone_range(self) -> bool:
        """The reported speedup lies within the range the model read alone over the rounds: where that range is
        wider than the tolerance, the ground truth cannot tell the two apart."""
        return self.isolated_min <= self.reported_speedup <= self.isolated_max

    def verdict(self, tolerance: float) -> str:
        """``agrees`` (within the tolerance), ``within the truth's noise`` (off by more, but inside the alone
        range), or ``disagrees`` (outside both: the search's figure is wrong by more than the truth moves)."""
        if abs(self.rel_error) <= tolerance:
            return AGREES
        return NOISY if self.inside_alone_range else DISAGREES


AGREES, NOISY, DISAGREES = "agrees", "within the truth's noise", "disagrees"


def save_profiles(run_dir: Path, profiles: Sequence[DeviceProfile]) -> None:
    """Record the profiles a run measured with, by content (so verify works after the YAML files moved)."""
    write_text_atomic(Path(run_dir) / PROFILES_FILE, json.dumps([p.to_dict() for p in profiles], indent=2))


def load_run_profiles(run_dir: Path) -> List[DeviceProfile]:
    path = Path(run_dir) / PROFILES_FILE
    if not path.is_file():
        raise RunError(f"{path} does not exist; is {run_dir} the --out of a hwprune search (made by this version)?")
    return [DeviceProfile.from_dict(d) for d in json.loads(path.read_text())]


def _model_file(run_dir: Path, trial: int, batch: int) -> Path:
    """The exported ONNX of a front model at the profile's batch size (re-exported from model.pt if needed)."""
    folder = run_dir / "models" / f"trial-{trial}"
    onnx_path = folder / "model.onnx"
    if not onnx_path.is_file():
        raise RunError(f"{onnx_path} does not exist; export the front first: hwprune export --run {run_dir} --pareto")
    if batch == 1:
        return onnx_path
    import torch

    from hwprune.export import to_onnx

    out = run_dir / "verify" / f"b{batch}" / f"trial-{trial}.onnx"
    if not out.is_file():
        model = torch.load(folder / "model.pt", weights_only=False)  # this run's own export
        metrics = json.loads((folder / "metrics.json").read_text())
        if metrics.get("inputs"):  # named (token) inputs
            from hwprune.inputs import InputSpec

            to_onnx(model, InputSpec.from_dict(metrics["inputs"]), out, batch=batch)
        else:
            to_onnx(model, (batch, *metrics["input_shape"][1:]), out)
    return out


def _reference_file(run_dir: Path, batch: int, model_file: Optional[Path]) -> Path:
    """The dense model the search timed at ``batch``; for token inputs (one file per sequence length), the one
    at the exported front models' sequence length."""
    plain = run_dir / "reference" / f"model-b{batch}.onnx"
    if plain.is_file() or model_file is None:
        return plain
    inputs = _onnx_shape(model_file)
    if isinstance(inputs, list):
        return plain
    length = inputs.fields[0].shape[-1]
    return run_dir / "reference" / f"model-b{batch}-s{length}.onnx"


def time_files_alone(profile: DeviceProfile, files: Dict[str, Path], rounds: int,
                     log: Callable[[str], None] = print) -> Dict[str, List[float]]:
    """Median latency of every file in every round, each timed alone in a fresh process; the order rotates
    between rounds so that no file always runs first (or right after the same neighbour)."""
    from hwprune.latency.worker import time_alone

    names = list(files)
    out: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(time_alone(profile, str(files[n]), _onnx_shape(files[n])).median_ms)
        log(f"verify [{profile.name}] round {r + 1}/{rounds} done")
    return out


def speedup_over_rounds(dense_ms: Sequence[float], model_ms: Sequence[float]) -> Tuple[float, float, float]:
    """(median, min, max) over rounds of dense / model, each round's pair timed in the same rotation."""
    per_round = [d / m for d, m in zip(dense_ms, model_ms)]
    return statistics.median(per_round), min(per_round), max(per_round)


def _onnx_shape(path: Path):
    """What the worker is handed for an exported file: the plain shape of a model with one image input, else the
    input spec its named inputs declare (token ids are then zeros: the same work as any other ids)."""
    import onnx

    from hwprune.inputs import IMAGE_INPUT_NAME, InputField, InputSpec

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    shapes = [[d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim] for i in inputs]
    dtypes = ["int64" if i.type.tensor_type.elem_type == onnx.TensorProto.INT64 else "float32" for i in inputs]
    if len(inputs) == 1 and inputs[0].name == IMAGE_INPUT_NAME and dtypes[0] == "float32":
        return shapes[0]
    return InputSpec(tuple(InputField(i.name, t, tuple(s[1:])) for i, t, s in zip(inputs, dtypes, shapes)))


def verify_run(run_dir: Path, profile_names: Optional[Sequence[str]] = None, rounds: int = 3,
               tolerance: float = 0.05, log: Callable[[str], None] = print) -> List[VerifyRow]:
    run_dir = Path(run_dir)
    if rounds < 1:
        raise RunError(f"--rounds {rounds} must be at least 1")
    pareto_path = run_dir / "pareto.csv"
    if not pareto_path.is_file():
        raise RunError(f"{pareto_path} does not exist; is {run_dir} a finished hwprune search (--out)?")
    front = pd.read_csv(pareto_path)
    profiles = load_run_profiles(run_dir)
    if profile_names:
        known = {p.name for p in profiles}
        unknown = [n for n in profile_names if n not in known]
        if unknown:
            raise RunError(f"profile {unknown[0]!r} was not measured in {run_dir}; choose from: {', '.join(known)}")
        profiles = [p for p in profiles if p.name in profile_names]
    rows: List[VerifyRow] = []
    for p in profiles:
        if p.backend != "onnxruntime":
            log(f"verify: skipping profile {p.name!r} (backend {p.backend}): timing alone in a fresh process is "
                f"implemented for ONNX Runtime profiles")
            continue
        ratio_col = f"latency_ratio:{p.name}"
        if ratio_col not in front.columns:
            raise RunError(f"{pareto_path} has no column {ratio_col}; rerun the search with this version")
        trials = [int(t) for t in front.trial if front.loc[front.trial == t, ratio_col].notna().all()]
        models = {f"trial-{t}": _model_file(run_dir, t, p.batch_size) for t in trials}
        dense_path = _reference_file(run_dir, p.batch_size, next(iter(models.values()), None))
        if not dense_path.is_file():
            raise RunError(f"{dense_path} (the dense model the search compared against) is missing")
        files = {"dense": dense_path, **models}
        times = time_files_alone(p, files, rounds, log)
        for t in trials:
            iso, lo, hi = speedup_over_rounds(times["dense"], times[f"trial-{t}"])
            ratio = float(front.loc[front.trial == t, ratio_col].iloc[0])
            reported = 1.0 / ratio
            rows.append(VerifyRow(p.name, t, reported, iso, lo, hi, reported / iso - 1.0,
                                  statistics.median(times[f"trial-{t}"]), statistics.median(times["dense"]), rounds))
    _write(run_dir, front, rows, tolerance)
    return rows


def _write(run_dir: Path, front: pd.DataFrame, rows: List[VerifyRow], tolerance: float) -> None:
    if not rows:
        return
    records = [{**asdict(r), "isolated_spread": r.spread, "verdict": r.verdict(tolerance)} for r in rows]
    write_text_atomic(run_dir / "verify.csv", pd.DataFrame(records).to_csv(index=False))
    plot_verify(rows, run_dir / "verify.png", tolerance)
    for r, record in zip(rows, records):
        sel = front.trial == r.trial
        front.loc[sel, f"isolated_speedup:{r.profile}"] = r.isolated_speedup
        front.loc[sel, f"isolated_ms:{r.profile}"] = r.model_ms
        front.loc[sel, f"verify_error:{r.profile}"] = r.rel_error
        front.loc[sel, f"verify_verdict:{r.profile}"] = record["verdict"]
        metrics = run_dir / "models" / f"trial-{r.trial}" / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            m.setdefault("verify", {})[r.profile] = record
            write_text_atomic(metrics, json.dumps(m, indent=2, sort_keys=True))
    write_text_atomic(run_dir / "pareto.csv", front.to_csv(index=False))


def plot_verify(rows: Sequence[VerifyRow], path: Path, tolerance: float) -> None:
    """Reported vs isolated speedup per front model (one colour per profile), the identity line and the
    tolerance band: points off the band are figures the search got wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    hi = max(max(r.reported_speedup, r.isolated_max) for r in rows) * 1.1
    xs = [1.0, hi]
    ax.plot(xs, xs, color="black", lw=1, label="reported = alone")
    ax.fill_between(xs, [x * (1 - tolerance) for x in xs], [x * (1 + tolerance) for x in xs], color="0.85",
                    label=f"within {100 * tolerance:g}%")
    for prof in dict.fromkeys(r.profile for r in rows):
        sel = [r for r in rows if r.profile == prof]
        ax.errorbar([r.isolated_speedup for r in sel], [r.reported_speedup for r in sel],
                    xerr=[[r.isolated_speedup - r.isolated_min for r in sel],
                          [r.isolated_max - r.isolated_speedup for r in sel]], fmt="o", capsize=3, label=prof)
    ax.set_xlabel("speedup, each model alone in a fresh process (range over rounds)")
    ax.set_ylabel("speedup reported by the search")
    ax.set_xlim(0.9, hi)
    ax.set_ylim(0.9, hi)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_rows(rows: Sequence[VerifyRow], tolerance: float) -> str:
    lines = [f"{'profile':<14} {'trial':>5} {'reported':>9} {'alone':>9} {'alone range':>15} {'error':>8}"]
    marks = {AGREES: "", NOISY: "  exceeds, inside the alone range", DISAGREES: "  EXCEEDS"}
    for r in rows:
        mark = marks[r.verdict(tolerance)]
        spread = f"{r.isolated_min:.2f}-{r.isolated_max:.2f}x"
        lines.append(f"{r.profile:<14} {r.trial:>5} {r.reported_speedup:>8.2f}x {r.isolated_speedup:>8.2f}x "
                     f"{spread:>15} {100 * r.rel_error:>+7.1f}%{mark}")
    return "\n".join(lines)


def summary_line(rows: Sequence[VerifyRow], tolerance: float) -> str:
    """One line: how many reported speedups agree, how many only within the ground truth's own noise (with what
    to do about it), and how many disagree."""
    counts = {v: sum(r.verdict(tolerance) == v for r in rows) for v in (AGREES, NOISY, DISAGREES)}
    line = f"{counts[AGREES]} of {len(rows)} reported speedups within {100 * tolerance:g}% of the models timed alone"
    if counts[NOISY]:
        line += (f"; {counts[NOISY]} off by more but inside the range the model read alone over the rounds (the "
                 f"truth itself moves more than {100 * tolerance:g}% here: more --rounds, fewer threads than cores, "
                 f"or a quieter machine decide them)")
    if counts[DISAGREES]:
        line += f"; {counts[DISAGREES]} outside both (the search's figure is off)"
    return line
