"""The long finish of chosen models: more fine-tuning steps for trials of a run, the dense trial given exactly the
same steps so that the reported accuracy delta stays fair (extra training is never mistaken for pruning quality).

Each model starts from its trial's recovered weights (the search's recovery budget), trains ``steps`` more steps
with the search space's optimiser settings (optionally distilled from the dense model; always so on unlabelled
data), is scored by the run's objective (accuracy or a fidelity figure: hwprune.fidelity), and is written to
``RUN/models/trial-N/finetuned/`` (ONNX, PyTorch, metrics.json); ``RUN/finetune.csv`` lists every result.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pandas as pd
import torch

from hwprune.errors import RunError
from hwprune.export import save_torch
from hwprune.plan import PruningPlan
from hwprune.fidelity import quality
from hwprune.recover import train
from hwprune.results import rebuild_model
from hwprune.workload import Workload


def finetune_model(workload: Workload, model, steps: int, distill: bool, lr: Optional[float] = None, seed: int = 0,
                   progress: Optional[Callable[[int], None]] = None):
    """``steps`` more fine-tuning steps with the space's recovery settings; KD from the dense model if ``distill``
    (or the data has no labels)."""
    r = workload.space.recovery
    distill = distill or not workload.data.labeled
    return train(model, workload.data, steps=steps, lr=lr if lr is not None else r.lr, batch_size=r.batch_size,
                 optimizer=r.optimizer, weight_decay=r.weight_decay, teacher=workload.model if distill else None,
                 temperature=r.distill_temperature, alpha=r.distill_alpha, seed=seed,
                 distill_loss=r.distill_loss or "kl", hidden_weight=r.distill_hidden,
                 hidden_layers=r.distill_hidden_layers, progress=progress)


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc=desc, dynamic_ncols=True)


def _figure(workload: Workload, model, run_dir: Path) -> float:
    """The run's objective as reported: accuracy, agreement, cosine (fractions, higher is better) or kl (nats,
    lower is better)."""
    return quality(model, workload.model, workload.data, workload.objective, cache_dir=run_dir)[workload.objective]


def finetune_trials(workload: Workload, run_dir: Path, trials: pd.DataFrame, rows: pd.DataFrame, steps: int,
                    distill: bool = False, lr: Optional[float] = None, seed: int = 0,
                    log: Callable[[str], None] = print, resume: bool = False, progress: bool = False
                    ) -> pd.DataFrame:
    """Fine-tune the trials in ``rows`` and the dense trial of ``trials`` alike; write models and finetune.csv.
    ``resume``: start each model from its previous finish (``models/trial-N/finetuned/state_dict.pt``) instead of
    the search's weights, with a fresh learning-rate schedule; ``steps_total`` counts both finishes. ``progress``: a
    bar over each model's steps (a long finish runs for tens of minutes)."""
    if workload.data is None:
        raise RunError("finetune needs the run's data; this run was latency-only (--data none)")
    if steps <= 0:
        raise RunError(f"--steps {steps} must be a positive number of fine-tuning steps")
    run_dir = Path(run_dir)
    dense = trials[(trials.role == "dense") & (trials.state == "complete")]
    if dense.empty:
        raise RunError(f"{run_dir} has no completed dense trial to fine-tune alike; the comparison needs it")
    chosen = pd.concat([dense.head(1), rows[rows.trial != dense.iloc[0].trial]])
    lat_cols = [c for c in trials.columns if c.startswith(("latency_ms:", "speedup:"))]
    name = workload.objective
    results: List[Dict[str, object]] = []

    def finished(trial: int) -> Path:  # where a trial's finish is written (and --continue starts from)
        return run_dir / "models" / f"trial-{trial}" / "finetuned"

    def start_weights(trial: int) -> Path:
        return (finished(trial) if resume else run_dir / "trials" / f"trial-{trial}") / "state_dict.pt"

    for trial in chosen.trial.astype(int):  # every start point checked before any model trains
        if not start_weights(trial).is_file():
            raise RunError(f"trial {trial} of {run_dir} has no earlier finish to continue ({start_weights(trial)}); "
                           f"run hwprune finetune without --continue first" if resume else
                           f"trial {trial} of {run_dir} has no recovered weights ({start_weights(trial)}); it was "
                           f"not trained")
    for _, row in chosen.iterrows():
        trial = int(row.trial)
        out = finished(trial)
        done = json.loads((out / "metrics.json").read_text()) if resume and (out / "metrics.json").is_file() else {}
        total = int(done.get("steps_total", done.get("steps", 0))) + steps  # "steps": a finish before --continue
        # masked layers come back with their masks (the plan replays them), so zeros hold through the new steps
        model = rebuild_model(workload, PruningPlan.from_json(row["plan"]), start_weights(trial))
        before = _figure(workload, model, run_dir)
        bar = _bar(steps, f"trial {trial}") if progress else None
        try:
            model = finetune_model(workload, model, steps, distill, lr, seed,
                                   progress=(lambda _step: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        after = _figure(workload, model, run_dir)
        out.mkdir(parents=True, exist_ok=True)
        workload.export_onnx(model, out / "model.onnx")
        save_torch(model, out / "model.pt")
        torch.save(model.state_dict(), out / "state_dict.pt")  # with mask buffers: what --continue starts from
        res = {"trial": trial, "role": row.role, "plan_summary": row.plan_summary, "steps": steps,
               "steps_total": total,
               "distill": bool(distill or not workload.data.labeled), f"{name}_search": float(row[name]),
               f"{name}_before": before, f"{name}_finetuned": after,
               **{c: row[c] for c in lat_cols if pd.notna(row[c])}}
        results.append(res)
        log(f"trial {trial}: {name} {before:.4f} -> {after:.4f} after {steps} more steps"
            + (f" ({total} in all)" if resume else "")
            + (" (distilled)" if res["distill"] else ""))
    table = pd.DataFrame(results)
    dense_after = float(table.iloc[0][f"{name}_finetuned"])
    if name == "kl":  # nats, lower is better
        table["delta_vs_dense_nats"] = table[f"{name}_finetuned"] - dense_after
    else:  # fractions: percentage points
        table["delta_vs_dense_pp"] = 100 * (table[f"{name}_finetuned"] - dense_after)
    for _, res in table.iterrows():
        path = finished(int(res.trial)) / "metrics.json"
        path.write_text(json.dumps({**{k: (v.item() if hasattr(v, "item") else v) for k, v in res.items()},
                                    f"dense_{name}_finetuned": dense_after}, indent=2, sort_keys=True))
    previous = run_dir / "finetune.csv"
    if previous.is_file():  # keep results of other trials fine-tuned earlier
        old = pd.read_csv(previous)
        table_all = pd.concat([old[~old.trial.isin(table.trial)], table]) if not old.empty else table
    else:
        table_all = table
    table_all.to_csv(previous, index=False)
    return table
