"""The CLI's user errors: exactly one ``hwprune: error:`` line on stderr, a non-zero exit, no traceback.

Most cases call ``hwprune.cli.main`` in this process (seconds matter); a few run the installed ``hwprune``
console script in a subprocess, so that the real entry point, its imports and anything else written to stderr
are part of what is checked too."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_net

HWPRUNE = shutil.which("hwprune") or str(Path(sys.executable).with_name("hwprune"))


def run_cli(args, cwd, pythonpath=None, subprocess_=False):
    if not subprocess_:
        from hwprune.cli import main

        out, err = io.StringIO(), io.StringIO()
        old = os.getcwd()
        try:
            os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(list(args))
        finally:
            os.chdir(old)
        return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([HWPRUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_one_error_line(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.startswith("hwprune: error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip("\n").splitlines()[-1] == errors[0]  # the error is the last thing said
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def cli_dir(tmp_path, factory_module, space_file, profile_file):
    """A working directory with a factory module (importable through PYTHONPATH), a fast space and profile."""
    return {"cwd": tmp_path, "module": factory_module, "space": str(space_file), "profile": str(profile_file)}


def _prune(d, *extra, model=None, data="none", shape="1,8,8"):
    args = ["prune", "--model", model or f"{d['module']}:tiny", "--data", data, "--ratio", "0.5",
            "--search-space", d["space"], "--profile", d["profile"], "--no-recover", "--out", str(d["cwd"] / "out")]
    if shape:
        args += ["--input-shape", shape]
    return args + list(extra)


def test_unknown_model(cli_dir):
    proc = run_cli(_prune(cli_dir, model="resnet_nineteen"), cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "unknown model 'resnet_nineteen'", "torchvision:NAME")
    proc = run_cli(_prune(cli_dir, model="torchvision:resnet19", shape="3,32,32"), cli_dir["cwd"])
    assert_one_error_line(proc, "resnet19")


def test_unreadable_checkpoint(cli_dir):
    bad = cli_dir["cwd"] / "broken.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    proc = run_cli(_prune(cli_dir, model=str(bad)), cli_dir["cwd"], subprocess_=True)
    assert_one_error_line(proc, "broken.pt", "not readable")
    proc = run_cli(_prune(cli_dir, "--weights", str(bad)), cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "weights file", "not a readable state_dict")


def test_weights_that_do_not_fit(cli_dir):
    wrong = cli_dir["cwd"] / "demo_weights.pt"
    torch.save(make_tiny_net().state_dict(), wrong)
    proc = run_cli(_prune(cli_dir, "--weights", str(wrong)), cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "does not fit the model")


def test_missing_data_path(cli_dir):
    missing = cli_dir["cwd"] / "no_images_here"
    proc = run_cli(_prune(cli_dir, data=f"imagefolder:{missing}", shape=None), cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "no_images_here", "does not exist")
    proc = run_cli(_prune(cli_dir, data=f"torchvision:MNIST:{missing}", shape=None), cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "never downloads")
    assert not missing.exists()


def test_bad_yaml(cli_dir):
    bad = cli_dir["cwd"] / "bad-space.yaml"
    bad.write_text("ratios: [0.0, 0.5\nround_to: 8\n")
    args = _prune(cli_dir)
    args[args.index("--search-space") + 1] = str(bad)
    proc = run_cli(args, cli_dir["cwd"], cli_dir["cwd"], subprocess_=True)
    assert_one_error_line(proc, "bad-space.yaml", "not valid YAML", "line ")
    typo = cli_dir["cwd"] / "typo-space.yaml"
    typo.write_text("ratio: [0.0, 0.5]\n")
    args[args.index("--search-space") + 1] = str(typo)
    proc = run_cli(args, cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "typo-space.yaml", "unknown key 'ratio'", "ratios")


def test_input_shape_mismatch(cli_dir):
    proc = run_cli(_prune(cli_dir, shape="3,8,8"), cli_dir["cwd"], cli_dir["cwd"])
    assert_one_error_line(proc, "(1, 3, 8, 8)", "--input-shape")


def test_latency_budget_no_plan_can_meet(cli_dir):
    out = cli_dir["cwd"] / "run"
    args = ["search", "--model", f"{cli_dir['module']}:tiny", "--data", "none", "--input-shape", "1,8,8",
            "--search-space", cli_dir["space"], "--profile", cli_dir["profile"], "--latency-budget-ms", "0.0001",
            "--trials", "2", "--no-progress", "--out", str(out)]
    proc = run_cli(args, cli_dir["cwd"], cli_dir["cwd"], subprocess_=True)
    assert_one_error_line(proc, "latency budget 0.0001 ms", "cannot be met")


def test_debug_shows_the_traceback(cli_dir):
    """The contrast case: the one-line error is the handler's doing, and --debug turns it off."""
    proc = run_cli(["--debug", *_prune(cli_dir, model="resnet_nineteen")], cli_dir["cwd"], cli_dir["cwd"],
                   subprocess_=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ModelError" in proc.stderr
