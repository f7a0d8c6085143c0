"""Bad input anywhere on the command line or in a YAML file: one ``hwprune: error:`` line, exit 2, never a
traceback. Property-based: hypothesis builds random argument lists and YAML documents and runs the CLI in this
process (every generated command fails or finishes within milliseconds: the model reference never exists)."""
from __future__ import annotations

import contextlib
import io
import math
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwprune.cli import main

NUMBERS = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "0", "-0", "0x10", "", " ", "1,5", "½", "None"]),
)
JUNK = st.one_of(NUMBERS, st.text(max_size=12), st.sampled_from(["--", "-", "--help-me", "--trials", "=", "\x00x"]))
FLAGS = {
    "search": ["--trials", "--timeout", "--latency-budget-ms", "--max-drop", "--screen-margin", "--heartbeat", "--grace", "--seed",
               "--image-size", "--sampler", "--budget-profile", "--study", "--input-shape"],
    "prune": ["--ratio", "--seed", "--image-size", "--input-shape"],
    "profile": ["--lut-check", "--top", "--seed", "--input-shape"],
    "export": ["--trial", "--best-under-ms", "--study"],
}


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_clean(rc, err):
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    if rc == 2:
        assert len(errors) == 1 and errors[0].startswith("hwprune: error: "), err


@st.composite
def command_lines(draw, tmp: Path):
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = [command]
    if command == "export":
        argv += ["--run", str(tmp / "no-such-run"), "--trial", "0"]
    else:
        argv += ["--model", str(tmp / "missing.pt"), "--data", "none", "--out", str(tmp / "out")]
        if command == "prune":
            argv += ["--ratio", "0.5"]
    for _ in range(draw(st.integers(0, 4))):
        argv += [draw(st.sampled_from(FLAGS[command])), draw(JUNK)]
    if draw(st.booleans()):
        argv.insert(draw(st.integers(1, len(argv))), draw(JUNK))
    return argv


def test_random_command_lines_give_one_line_and_exit_2(tmp_path):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(command_lines(tmp_path))
    def check(argv):
        rc, _, err = run(argv)
        assert_clean(rc, err)

    check()


YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
SPACE_KEYS = ["description", "prunable", "ignore", "ratios", "round_to", "importance", "recovery", "structures"]
PROFILE_KEYS = ["description", "backend", "batch_size", "options", "measure", "accelerates"]


@st.composite
def yaml_documents(draw, keys):
    doc = draw(st.dictionaries(st.sampled_from(keys + ["surprise"]), YAML_VALUES, max_size=6))
    if "measure" in doc or draw(st.booleans()):
        doc["measure"] = draw(st.dictionaries(
            st.sampled_from(["warmup", "min_repeats", "max_repeats", "target_rel_ci", "time_cap_s",
                             "interleave_block"]), YAML_VALUES, max_size=4))
    text = yaml.safe_dump(doc, allow_unicode=True)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))] + draw(st.sampled_from(["\t:", "{[", "- - :", "\x00"]))
    return text


def test_random_yaml_files_give_one_line_and_exit_2(tmp_path):
    """A random search space or device profile YAML through the CLI: either accepted (then the missing model is
    the error) or refused in one line; never a traceback."""
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(["space", "profile"]), st.data())
    def check(kind, data):
        text = data.draw(yaml_documents(SPACE_KEYS if kind == "space" else PROFILE_KEYS))
        path = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        which = ["--search-space", str(path)] if kind == "space" else ["--profile", str(path)]
        rc, _, err = run(["prune", "--model", str(tmp_path / "missing.pt"), "--data", "none", "--ratio", "0.5",
                          "--out", str(tmp_path / "out"), *which])
        assert rc == 2
        assert_clean(rc, err)

    check()


@pytest.mark.parametrize("argv, fragment", [
    (["search", "--trials", "0"], "--trials: 0 must be at least 1"),
    (["search", "--latency-budget-ms", "nan"], "not a finite number"),
    (["search", "--latency-budget-ms", "-5"], "must be above 0"),
    (["search", "--timeout", "inf"], "not a finite number"),
    (["search", "--grace", "4", "--heartbeat", "3"], "at least twice the heartbeat"),
    (["prune", "--ratio", "1.5"], "at most 0.99"),
    (["export", "--run", ".", "--best-under-ms", "0"], "must be above 0"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, argv, fragment):
    extra = [] if argv[0] == "export" else ["--model", "demo", "--out", str(tmp_path / "o")]
    if argv[0] == "prune" and "--ratio" not in argv:
        extra += ["--ratio", "0.5"]
    rc, _, err = run([*argv, *extra])
    assert rc == 2 and fragment in err, err
    assert not (tmp_path / "o").exists()  # nothing was started: no demo training, no run directory


def test_search_config_is_checked_for_api_callers_too(tmp_path):
    from hwprune.errors import ConfigError
    from hwprune.search import SearchConfig, check_search_config

    for bad in ({"trials": 0}, {"latency_budget_ms": math.nan}, {"timeout_s": -1.0}, {"screen_margin": math.inf}):
        with pytest.raises(ConfigError):
            check_search_config(SearchConfig(out_dir=tmp_path, **bad))
