"""Model references: demo, torchvision:NAME, a torch.save'd model file, package.module:factory, --weights."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hwprune.errors import ModelError
from hwprune.models import DemoNet, check_input, load_model, load_or_train_demo, output_layer_names

from conftest import make_tiny_net


def test_demo_reference():
    m = load_model("demo", num_classes=7, in_channels=3)
    assert isinstance(m, DemoNet) and not m.training
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 7)


def test_torchvision_reference_random_init_with_classes():
    m = load_model("torchvision:resnet18", num_classes=10)
    assert not m.training and m.fc.out_features == 10
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_unknown_name_hints():
    with pytest.raises(ModelError) as e:
        load_model("torchvision:resnet19")
    assert "'resnet19'" in str(e.value) and "resnet18" in str(e.value)


def test_whole_model_file_round_trip(tmp_path, tiny_net, example_input):
    path = tmp_path / "net.pt"
    torch.save(tiny_net, path)
    m = load_model(str(path), trust_pickle=True)
    assert isinstance(m, DemoNet) and not m.training
    with torch.no_grad():
        torch.testing.assert_close(m(example_input), tiny_net(example_input))


class _RunsCodeWhenUnpickled:
    """What a hostile model file can hold: unpickling calls Path.touch (any callable would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_model_file_is_refused_without_trust(tmp_path, tiny_net):
    """A pickled whole module runs code on load: refused (nothing executed) unless --trust-pickle is given."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save(_RunsCodeWhenUnpickled(marker), path)
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "--trust-pickle" in str(e.value) and "runs code" in str(e.value)
    assert not marker.exists()
    torch.save(tiny_net, tmp_path / "net.pt")
    with pytest.raises(ModelError, match="--trust-pickle"):
        load_model(str(tmp_path / "net.pt"))


def test_state_dict_as_model_file_is_a_model_error(tmp_path, tiny_net):
    path = tmp_path / "sd.pt"
    torch.save(tiny_net.state_dict(), path)
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    assert "state_dict" in str(e.value) and "--weights" in str(e.value)


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"this is not a torch file\x00\x01")
    with pytest.raises(ModelError, match="not readable"):
        load_model(str(path))


def test_model_file_holding_a_tensor(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelError, match="Tensor"):
        load_model(str(path))


def test_missing_model_file_and_weights_on_a_file(tmp_path, tiny_net):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    path = tmp_path / "net.pt"
    torch.save(tiny_net, path)
    with pytest.raises(ModelError, match="--weights"):
        load_model(str(path), weights=str(path))


def test_unknown_reference_lists_choices():
    with pytest.raises(ModelError) as e:
        load_model("resnet18")
    assert "'resnet18'" in str(e.value) and "torchvision:NAME" in str(e.value)


def test_factory_reference(factory_module):
    m = load_model(f"{factory_module}:tiny")
    assert isinstance(m, nn.Sequential) and not m.training
    assert m(torch.randn(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("attr, fragment", [("not_a_model", "not a torch.nn.Module"), ("missing", "no callable"),
                                            ("VALUE", "no callable")])
def test_factory_errors(factory_module, attr, fragment):
    with pytest.raises(ModelError, match=fragment):
        load_model(f"{factory_module}:{attr}")


def test_factory_module_not_importable():
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg_xyz.models'"):
        load_model("no_such_pkg_xyz.models:build")


def test_weights_state_dict_loads(tmp_path, factory_module):
    torch.manual_seed(1)
    src = load_model(f"{factory_module}:tiny")
    with torch.no_grad():
        src[1].running_mean.fill_(0.3)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)  # a different random init, overwritten by the weights
    m = load_model(f"{factory_module}:tiny", weights=str(path))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src.eval()(x))
    # a checkpoint dict with a "state_dict" entry works too
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, wrapped)
    m2 = load_model(f"{factory_module}:tiny", weights=str(wrapped))
    torch.testing.assert_close(m2[0].weight, src[0].weight)


def test_weights_that_do_not_fit(tmp_path, factory_module):
    path = tmp_path / "other.pt"
    torch.save(make_tiny_net().state_dict(), path)  # a DemoNet's weights for the Sequential factory model
    with pytest.raises(ModelError) as e:
        load_model(f"{factory_module}:tiny", weights=str(path))
    assert "does not fit the model" in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_weights_with_wrong_shapes(tmp_path):
    path = tmp_path / "r18-1000.pt"
    torch.save(load_model("torchvision:resnet18").state_dict(), path)  # 1000 classes
    with pytest.raises(ModelError, match="does not fit"):
        load_model("torchvision:resnet18", weights=str(path), num_classes=10)


def test_weights_missing_corrupt_or_not_a_dict(tmp_path, factory_module):
    ref = f"{factory_module}:tiny"
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ref, weights=str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a readable state_dict"):
        load_model(ref, weights=str(bad))
    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(ModelError, match="not a state_dict"):
        load_model(ref, weights=str(lst))


def test_check_input_fits_and_does_not_fit(tiny_net):
    x = check_input(tiny_net, (1, 8, 8), "data 'digits'")
    assert x.shape == (1, 1, 8, 8)
    with pytest.raises(ModelError) as e:
        check_input(tiny_net, (3, 8, 8), "data 'x'")
    msg = str(e.value)
    assert "(1, 3, 8, 8)" in msg and "--input-shape" in msg and "\n" not in msg


def test_check_input_rejects_non_classifier_output():
    conv = nn.Conv2d(1, 4, 3)
    with pytest.raises(ModelError, match="classifier logits"):
        check_input(conv, (1, 8, 8), "--input-shape")


def test_output_layer_names(tiny_net):
    assert output_layer_names(tiny_net, 10) == ("fc",)
    assert output_layer_names(load_model("torchvision:resnet18"), 1000) == ("fc",)
    # a 1x1 conv classifier (SqueezeNet style) counts too
    sq = load_model("torchvision:squeezenet1_1", num_classes=10)
    assert output_layer_names(sq, 10) == ("classifier.1",)
    assert output_layer_names(tiny_net, 123) == ()


def test_demo_is_trained_once_and_cached(tmp_path, tiny_digits, monkeypatch):
    import hwprune.models as models
    from conftest import TINY_WIDTHS

    # the caching logic, not the full-size demo network, is under test: train the tiny one
    monkeypatch.setattr(models, "DemoNet", lambda in_channels, num_classes: DemoNet(in_channels, num_classes,
                                                                                    TINY_WIDTHS))
    cache = tmp_path / "demo.pt"
    logs = []
    m1 = load_or_train_demo(cache, tiny_digits, epochs=1, log=logs.append)
    assert cache.is_file() and any("training the demo model" in l for l in logs)
    logs.clear()
    m2 = load_or_train_demo(cache, tiny_digits, epochs=1, log=logs.append)
    assert logs == []  # loaded, not trained again
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m1(x), m2(x))
    blob = torch.load(cache, weights_only=True)
    assert blob["data"] == "digits-tiny" and 0.0 <= blob["val_accuracy"] <= 1.0


def test_load_errors_are_one_line_with_the_cause(tmp_path, factory_module):
    """Regression: torch's weights-only failure is many lines of advice (and suggested weights_only=False);
    the error now names the cause in one line."""
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ModelError) as e:
        load_model(f"{factory_module}:tiny", weights=str(bad))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    whole = tmp_path / "whole.pt"
    torch.save(make_tiny_net(), whole)
    with pytest.raises(ModelError) as e:
        load_model(f"{factory_module}:tiny", weights=str(whole))
    msg = str(e.value)
    assert "\n" not in msg and "not a plain state_dict" in msg and "--model" in msg and "DemoNet" in msg
