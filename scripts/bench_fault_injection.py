"""Fault injection: two search workers on a fresh PostgreSQL database, killed with SIGKILL at random moments over
N rounds, then one final resume. Counts what a kill can cost a shared study:

- lost: trials a dead worker held that were never run again (FAIL without a recorded reason and without a retry),
  plus finished trials short of the requested count after the final resume;
- duplicated: a second COMPLETE run of the same trial (a retry completing next to its original), more than one
  COMPLETE dense baseline, or COMPLETE trials beyond the requested count;
- stranded RUNNING: trials still RUNNING after the final resume;
- truncated files: output files (csv/json/png/onnx/pt in the run directory) that do not parse, checked after every
  round.

Each round starts both workers at the same instant with a larger ``--trials`` target, kills one of them (or both)
after a random delay, lets a survivor finish, and checks every file. Tiny model, ``--data digits`` and a 2-ratio
search space keep a trial around a second.

  python scripts/bench_fault_injection.py --rounds 20 --out scripts/results/fault_injection.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPACE = """description: fault-injection space (tiny)
prunable: ["*"]
ratios: [0.0, 0.25, 0.5]
round_to: 4
importance: l1
recovery: {bn_recalibration_batches: 1, finetune_steps: 5, batch_size: 32, lr: 0.01, optimizer: sgd}
"""
PROFILE = """description: ONNX Runtime CPU, one thread, short measurements
backend: onnxruntime
batch_size: 1
options: {provider: CPUExecutionProvider, threads: 1, inter_op_threads: 1, graph_optimization_level: all}
measure: {warmup: 1, min_repeats: 3, max_repeats: 5, target_rel_ci: 0.5, time_cap_s: 0.3}
accelerates: [filter, channel]
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--trials-per-round", type=int, default=4, help="the --trials target grows by this each round")
    ap.add_argument("--min-delay-s", type=float, default=2.0)
    ap.add_argument("--max-delay-s", type=float, default=20.0, help="kills fall uniformly in [--min-delay-s, this] s")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="an existing database to run CREATE/DROP DATABASE from")
    ap.add_argument("--work", default="/tmp/hwprune-fault-injection")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--code", default=str(ROOT), help="the hwprune checkout the workers run (e.g. an older commit, "
                    "for a before/after comparison; flags it does not know are left out)")
    ap.add_argument("--out", default=str(ROOT / "scripts" / "results" / "fault_injection.md"))
    return ap.parse_args(argv)


def fresh_database(admin_url: str) -> tuple:
    import psycopg2

    name = f"hwprune_fault_{uuid.uuid4().hex[:10]}"
    con = psycopg2.connect(admin_url)
    con.autocommit = True
    con.cursor().execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
    return con, name, f"{base}/{name}"


def _count(dsn: str, sql: str, args=()) -> int:
    """A count from the study's tables (0 while Optuna's schema does not exist yet)."""
    import psycopg2

    try:
        with psycopg2.connect(dsn) as con, con.cursor() as cur:
            cur.execute(sql, args)
            return int(cur.fetchone()[0])
    except psycopg2.Error:
        return 0
    finally:
        with contextlib.suppress(Exception):
            con.close()


def wait_for(moment: str, dsn: str, pid: int, target: int, procs, timeout_s: float = 120.0) -> None:
    """Block until ``moment``: "trial" = worker ``pid`` holds a RUNNING trial; "end" = the study holds
    ``target`` COMPLETE trials (the workers are writing their results); "any" = at once."""
    sql = {"trial": ("SELECT COUNT(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                     "WHERE t.state = 'RUNNING' AND a.key = 'worker' AND a.value_json LIKE %s", (f'%:{pid}"',)),
           "end": ("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'", ())}.get(moment)
    deadline = time.time() + timeout_s
    while sql and time.time() < deadline and all(p.poll() is None for p in procs):
        if _count(dsn, *sql) >= (1 if moment == "trial" else target):
            return
        time.sleep(0.1)


def check_files(run: Path) -> list:
    """Output files that do not parse (a truncated or half-written file)."""
    import onnx
    import pandas as pd
    from PIL import Image

    bad = []
    for p in run.rglob("*"):
        if not p.is_file() or p.name.startswith(".") or "corrupt" in p.name:
            continue
        try:
            if p.suffix == ".csv":
                pd.read_csv(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".png":
                Image.open(p).verify()
            elif p.suffix == ".onnx":
                onnx.load(str(p))
            elif p.suffix == ".pt":  # torch.save writes a zip archive: a cut-short file fails its CRC check
                with zipfile.ZipFile(p) as z:
                    if z.testzip() is not None:
                        raise ValueError("CRC mismatch")
        except Exception as e:  # noqa: BLE001 (any failure to parse is what we count)
            bad.append(f"{p.relative_to(run)}: {type(e).__name__}")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    import optuna
    import torch

    from hwprune.models import DemoNet

    rng = random.Random(args.seed)
    work = Path(args.work) / uuid.uuid4().hex[:6]
    work.mkdir(parents=True)
    (work / "space.yaml").write_text(SPACE)
    (work / "cpu1.yaml").write_text(PROFILE)
    torch.manual_seed(0)
    torch.save(DemoNet(in_channels=1, num_classes=10, widths=(8, 16, 16)).eval(), work / "tiny.pt")
    admin, dbname, url = fresh_database(args.postgres)
    dsn = args.postgres.rsplit("/", 1)[0] + "/" + dbname
    code = Path(args.code).resolve()
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    current = "--trust-pickle" in (code / "hwprune" / "cli.py").read_text()
    new_flags = ["--trust-pickle", "--heartbeat", "2", "--grace", "10"] if current else []

    def command(trials: int) -> list:
        return ["nice", "-n", "19", sys.executable, "-m", "hwprune.cli", "search", "--model", str(work / "tiny.pt"),
                "--data", "digits", "--search-space", str(work / "space.yaml"),
                "--profile", str(work / "cpu1.yaml"), "--trials", str(trials), "--out", str(work / "run"),
                "--storage", url, "--study", "fi", "--sampler", "random", "--no-progress", *new_flags]

    truncated, kills, rounds = [], 0, []
    t0 = time.time()
    target = 0
    for r in range(args.rounds):
        target += args.trials_per_round
        procs = [subprocess.Popen(command(target), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                  cwd=code)
                 for _ in range(2)]
        victims = rng.choice([[0], [1], [0, 1]])
        # When to kill: inside a trial of the (first) victim, while results are written at the end, or any time.
        moment = rng.choice(["trial", "trial", "end", "any"])
        t_start = time.time()
        wait_for(moment, dsn, procs[victims[0]].pid, target, procs)
        time.sleep(rng.uniform(0, 2.0) if moment != "any" else rng.uniform(args.min_delay_s, args.max_delay_s))
        delay = time.time() - t_start
        killed = []
        for v in victims:
            if procs[v].poll() is None:
                os.kill(procs[v].pid, signal.SIGKILL)
                killed.append(v)
        kills += len(killed)
        codes = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            codes.append(p.returncode)
            if p.returncode not in (0, -signal.SIGKILL):
                print(err.decode()[-1500:], file=sys.stderr)
        bad = check_files(work / "run")
        states = [t.state.name for t in optuna.load_study(study_name="fi", storage=url).get_trials(deepcopy=False)]
        truncated += bad
        rounds.append({"round": r, "target": target, "moment": moment, "delay_s": round(delay, 1), "killed": killed, "exit": codes,
                       "bad_files": len(bad), "fail": states.count("FAIL"), "complete": states.count("COMPLETE")})
        print(f"round {r}: target {target}, kill ({moment}) after {delay:.1f} s of worker(s) {killed}, exit codes {codes}, "
              f"unparseable files {len(bad)}; study: {states.count('COMPLETE')} COMPLETE, {states.count('FAIL')} FAIL, "
              f"{states.count('RUNNING')} RUNNING, {states.count('WAITING')} WAITING", flush=True)
    final = subprocess.run(command(target), capture_output=True, env=env, timeout=1800, cwd=code)
    final_ok = final.returncode == 0
    if not final_ok:
        print(final.stderr.decode()[-2000:], file=sys.stderr)
    truncated += check_files(work / "run")
    trials = optuna.load_study(study_name="fi", storage=url).get_trials(deepcopy=False)
    S = optuna.trial.TrialState
    by_number = {t.number: t for t in trials}
    retried = {t.system_attrs.get("hwprune:retry_of") for t in trials} - {None}
    killed_trials = [t for t in trials if t.state == S.FAIL and "reason" not in t.user_attrs]
    lost_unretried = [t.number for t in killed_trials if t.number not in retried]
    # repeats of an earlier trial's model do not count toward --trials (search.reuse_results)
    complete = [t for t in trials if t.state == S.COMPLETE and "same_as" not in t.user_attrs]
    lost = len(lost_unretried) + max(0, target - len(complete))
    dup_retry = sum(1 for t in complete if t.system_attrs.get("hwprune:retry_of") in by_number
                    and by_number[t.system_attrs["hwprune:retry_of"]].state == S.COMPLETE)
    dense_complete = sum(t.user_attrs.get("role") == "dense" for t in complete)
    duplicated = dup_retry + max(0, dense_complete - 1) + max(0, len(complete) - target)
    stranded = sum(t.state == S.RUNNING for t in trials)
    minutes = (time.time() - t0) / 60
    lines = [
        "# Fault injection: SIGKILLed workers on a fresh PostgreSQL database",
        "",
        f"`python scripts/bench_fault_injection.py --rounds {args.rounds} --trials-per-round "
        f"{args.trials_per_round}{'' if current else ' --code ' + str(code)} --min-delay-s {args.min_delay_s:g} --max-delay-s {args.max_delay_s:g} --seed {args.seed}` "
        f"({minutes:.1f} min on a shared 2-core machine)",
        "",
        "Two workers start together on one study in a brand-new PostgreSQL database each round (round r asks for "
        f"{args.trials_per_round}(r+1) trials), one or both are killed with SIGKILL after a random delay, the "
        "survivor finishes; after the last round one resume runs. Heartbeat 2 s, grace 10 s.",
        "",
        "| rounds | SIGKILLs | trials requested | COMPLETE | killed trials (FAIL, re-queued) | lost | duplicated | "
        "stranded RUNNING | truncated files | dense COMPLETE | final resume exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.rounds} | {kills} | {target} | {len(complete)} | {len(killed_trials)} | {lost} | {duplicated} | "
        f"{stranded} | {len(truncated)} | {dense_complete} | {final.returncode} |",
        "",
        "Per round:",
        "",
        "| round | --trials | kill moment | kill after (s) | killed worker(s) | exit codes | unparseable files | COMPLETE | FAIL (killed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['round']} | {r['target']} | {r['moment']} | {r['delay_s']} | {r['killed'] or '-'} | {r['exit']} | "
              f"{r['bad_files']} | {r['complete']} | {r['fail']} |" for r in rounds]
    if truncated:
        lines += ["", "Unparseable files: " + "; ".join(sorted(set(truncated)))[:2000]]
    report = "\n".join(lines) + "\n"
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    try:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        admin.close()
    return 0 if final_ok and not (lost or duplicated or stranded or truncated) else 1


if __name__ == "__main__":
    sys.exit(main())
