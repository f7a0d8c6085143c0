"""Strict YAML: search spaces and device profiles. Every error names the file, the key path and the valid choices."""
from pathlib import Path

import pytest

from hwprune.config import (
    PROFILE_DIR, PROJECT_ROOT, SEARCH_SPACE_DIR, load_profile, load_profiles, load_search_space,
)
from hwprune.errors import ConfigError

SHIPPED_SPACES = sorted((PROJECT_ROOT / SEARCH_SPACE_DIR).glob("*.yaml"))
SHIPPED_PROFILES = sorted((PROJECT_ROOT / PROFILE_DIR).glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_there_are_shipped_files():
    assert len(SHIPPED_SPACES) >= 2 and len(SHIPPED_PROFILES) >= 2


@pytest.mark.parametrize("path", SHIPPED_SPACES, ids=lambda p: p.stem)
def test_every_shipped_search_space_loads(path):
    space = load_search_space(str(path))
    assert space.name == path.stem
    assert space.ratios == tuple(sorted(space.ratios)) and 0.0 <= min(space.ratios) and max(space.ratios) < 1
    # by stem too, from any working directory
    assert load_search_space(path.stem).ratios == space.ratios


@pytest.mark.parametrize("path", SHIPPED_PROFILES, ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path):
    prof = load_profile(str(path))
    assert prof.backend
    assert prof.batch_size >= 1
    assert prof.measure.min_repeats <= prof.measure.max_repeats


def test_fast_test_files_load(space_file, profile_file):
    space = load_search_space(str(space_file))
    assert space.name == "fast-space" and space.ratios == (0.0, 0.5) and space.round_to == 4
    assert space.recovery.finetune_steps == 2 and space.recovery.optimizer == "sgd"
    prof = load_profile(str(profile_file))
    assert prof.name == "fast-cpu" and prof.backend == "onnxruntime"
    assert prof.measure.max_repeats == 5 and prof.options["threads"] == 1


def test_unknown_top_level_key_names_file_key_and_valid_keys(tmp_path):
    p = _write(tmp_path, "ratios: [0.0, 0.5]\nratio: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_search_space(str(p))
    msg = str(e.value)
    assert str(p) in msg
    assert "'ratio'" in msg
    for valid in ("prunable", "ignore", "ratios", "round_to", "importance", "recovery"):
        assert valid in msg


def test_unknown_nested_key_names_the_key_path(tmp_path):
    p = _write(tmp_path, "recovery:\n  finetune_step: 10\n")
    with pytest.raises(ConfigError) as e:
        load_search_space(str(p))
    msg = str(e.value)
    assert str(p) in msg and "recovery" in msg and "'finetune_step'" in msg
    assert "finetune_steps" in msg and "bn_recalibration_batches" in msg  # the valid keys


def test_unknown_profile_measure_key(tmp_path):
    p = _write(tmp_path, "backend: onnxruntime\nmeasure:\n  repeats: 3\n", "prof.yaml")
    with pytest.raises(ConfigError) as e:
        load_profile(str(p))
    msg = str(e.value)
    assert str(p) in msg and "measure" in msg and "'repeats'" in msg and "min_repeats" in msg


def test_bad_importance_lists_choices(tmp_path):
    p = _write(tmp_path, "importance: l3\n")
    with pytest.raises(ConfigError) as e:
        load_search_space(str(p))
    msg = str(e.value)
    assert "importance" in msg and "'l3'" in msg
    for c in ("l1", "l2", "bn_scale", "taylor", "random"):
        assert c in msg


def test_bad_optimizer_lists_choices(tmp_path):
    p = _write(tmp_path, "recovery:\n  optimizer: rmsprop\n")
    with pytest.raises(ConfigError, match=r"recovery\.optimizer.*'rmsprop'.*sgd.*adam"):
        load_search_space(str(p))


def test_bad_backend_lists_choices(tmp_path):
    from hwprune.latency.base import backend_names

    p = _write(tmp_path, "backend: tensorrtx\n", "prof.yaml")
    with pytest.raises(ConfigError) as e:
        load_profile(str(p))
    msg = str(e.value)
    assert "backend" in msg and "'tensorrtx'" in msg
    assert all(b in msg for b in backend_names())


def test_missing_backend_is_an_error(tmp_path):
    p = _write(tmp_path, "batch_size: 1\n", "prof.yaml")
    with pytest.raises(ConfigError, match="missing key 'backend'"):
        load_profile(str(p))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("ratios: [0.0, 1.0]\n", "ratios[1]"),  # 1.0 would remove every channel
        ("ratios: [0.0, -0.1]\n", "ratios[1]"),
        ("ratios: []\n", "ratios"),
        ("ratios: [0.5, 0.5]\n", "twice"),
        ("ratios: [0.0, half]\n", "ratios[1]"),
        ("round_to: 0\n", "round_to"),
        ("round_to: eight\n", "round_to"),
        ("recovery:\n  finetune_steps: -1\n", "recovery.finetune_steps"),
        ("recovery:\n  distill: maybe\n", "recovery.distill"),
        ("recovery:\n  distill_alpha: 1.5\n", "recovery.distill_alpha"),
        ("prunable: 3\n", "prunable"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, fragment):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_search_space(str(p))
    assert fragment in str(e.value) and str(p) in str(e.value)


def test_round_to_one_means_none_and_int_ratio_is_accepted(tmp_path):
    p = _write(tmp_path, "round_to: 1\nratios: [0, 0.5]\n")
    space = load_search_space(str(p))
    assert space.round_to is None and space.ratios == (0.0, 0.5)


def test_bool_is_not_an_int(tmp_path):
    p = _write(tmp_path, "backend: onnxruntime\nbatch_size: true\n", "prof.yaml")
    with pytest.raises(ConfigError, match="batch_size"):
        load_profile(str(p))


def test_min_repeats_above_max_repeats(tmp_path):
    p = _write(tmp_path, "backend: onnxruntime\nmeasure:\n  min_repeats: 10\n  max_repeats: 5\n", "prof.yaml")
    with pytest.raises(ConfigError, match="min_repeats"):
        load_profile(str(p))


def test_invalid_yaml_gives_the_line(tmp_path):
    p = _write(tmp_path, "ratios: [0.0, 0.5]\nround_to: 8\nrecovery:\n  lr: [0.1\n  batch_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_search_space(str(p))
    msg = str(e.value)
    assert str(p) in msg and "not valid YAML" in msg
    assert "line 5" in msg  # where the unterminated flow sequence is found


def test_top_level_must_be_a_mapping(tmp_path):
    p = _write(tmp_path, "- 0.5\n- 0.75\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_search_space(str(p))


def test_empty_file_gives_defaults(tmp_path):
    p = _write(tmp_path, "")
    space = load_search_space(str(p))
    assert space.prunable == ("*",) and space.ignore == ()


def test_unknown_stem_lists_known_files():
    with pytest.raises(ConfigError) as e:
        load_search_space("no-such-space")
    msg = str(e.value)
    assert "'no-such-space'" in msg and "demo" in msg and "filters" in msg
    with pytest.raises(ConfigError, match="cpu-1thread"):
        load_profile("no-such-profile")


def test_same_profile_twice_is_an_error():
    with pytest.raises(ConfigError, match="twice"):
        load_profiles(["cpu", "cpu"])


def test_pattern_matching_no_layer_is_an_error_naming_it(tmp_path, tiny_net):
    from hwprune import graph

    names = [n for n, m in tiny_net.named_modules() if isinstance(m, graph.ROOT_TYPES)]
    ok = load_search_space(str(_write(tmp_path, "prunable: ['layer*']\nignore: ['fc']\n", "ok.yaml")))
    ok.check_patterns(names)  # both match something: no error
    assert ok.matches("layer1.0.conv1") and not ok.matches("fc") and not ok.matches("stem.0")

    bad = load_search_space(str(_write(tmp_path, "prunable: ['layer*']\nignore: ['clasifier*']\n", "bad.yaml")))
    with pytest.raises(ConfigError) as e:
        bad.check_patterns(names)
    msg = str(e.value)
    assert "'clasifier*'" in msg and "ignore" in msg and "bad.yaml" in msg
    assert "stem.0" in msg  # the layers that exist are listed

    bad2 = load_search_space(str(_write(tmp_path, "prunable: ['Layer1.*']\n", "bad2.yaml")))
    with pytest.raises(ConfigError, match=r"prunable pattern 'Layer1\.\*'"):
        bad2.check_patterns(names)  # matching is case-sensitive


def test_pattern_error_through_build_workload(tmp_path, factory_module):
    from hwprune.workload import build_workload

    p = _write(tmp_path, "prunable: ['conv_typo*']\n")
    with pytest.raises(ConfigError, match="'conv_typo\\*'"):
        build_workload(f"{factory_module}:tiny", "none", str(p), input_shape=(1, 8, 8), log=lambda m: None)
