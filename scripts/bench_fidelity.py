"""Benchmark: how well does the cheap fidelity (BN recalibration only, no fine-tuning) rank a run's trials
compared with the full recovery budget? Kendall tau and Spearman rho between the two accuracies over the run's
completed, trained trials; a prerequisite for screening candidates with the cheap score.

    nice -n 19 python scripts/bench_fidelity.py --run runs/bvb-vgg --report scripts/results/fidelity_vgg.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import optuna
import pandas as pd
import torch
from scipy.stats import kendalltau, spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_models for runs of the VGG benchmark

from hwprune.plan import PruningPlan  # noqa: E402
from hwprune.proposals import cheap_accuracy  # noqa: E402
from hwprune.workload import build_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--report")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    study = optuna.load_study(study_name="hwprune", storage=f"sqlite:///{run.resolve() / 'study.db'}")
    a = study.user_attrs
    workload = build_workload(a["model"], a["data"], a["search_space"], weights=a.get("weights"),
                              input_shape=a.get("input_shape"), run_dir=run, seed=a.get("seed", 0))
    df = pd.read_csv(run / "trials.csv")
    df = df[(df.state == "complete") & df.accuracy.notna()]
    rows = []
    for _, r in df.iterrows():
        ratios = PruningPlan.from_json(r.plan).ratios
        rows.append({"trial": int(r.trial), "full": r.accuracy, "cheap": cheap_accuracy(workload, ratios)})
    t = pd.DataFrame(rows)
    tau, rho = kendalltau(t.cheap, t.full)[0], spearmanr(t.cheap, t.full)[0]
    top = set(t.nlargest(5, "full").trial) & set(t.nlargest(5, "cheap").trial)
    text = (f"`{run}`: {len(t)} trained trials ({a['model']}, recovery {workload.space.recovery}). Cheap fidelity "
            f"(BN recalibration only) vs full recovery: Kendall tau {tau:.3f}, Spearman rho {rho:.3f}; "
            f"{len(top)} of the 5 most accurate trials are among the cheap score's top 5.\n\n"
            + t.sort_values("full").to_markdown(index=False, floatfmt=".4f"))
    print(text)
    (run / "fidelity.json").write_text(json.dumps({"kendall_tau": tau, "spearman": rho, "n": len(t)}))
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
