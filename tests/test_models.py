import pytest
import torch
from torchvision.ops import StochasticDepth

from selftrain.errors import ConfigError
from selftrain.models.registry import available_models, build_model, check_student_sizes, parameter_count


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "convnext_tiny"])
def test_each_family_builds_and_classifies(name):
    model = build_model(name, num_classes=7, dropout=0.3, stochastic_depth=0.2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())


def test_resnet_stochastic_depth_decays_linearly_to_the_last_block():
    model = build_model("resnet18", 10, stochastic_depth=0.2)
    probs = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(probs) == 8  # resnet18 has 8 basic blocks
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.2)
    assert probs == sorted(probs)


def test_eval_mode_is_deterministic_despite_noise():
    model = build_model("resnet18", 10, dropout=0.5, stochastic_depth=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="model 'resnet9' is not supported; choose one of: .*resnet18"):
        build_model("resnet9", 10)
    assert "efficientnet_b0" in available_models()


def test_student_smaller_than_teacher_is_refused():
    assert parameter_count("resnet34", 10) > parameter_count("resnet18", 10)
    check_student_sizes("resnet18", ["resnet18", "resnet34"], 10)
    with pytest.raises(ConfigError, match=r"model.students\[1\]=resnet18 .* is smaller than model.students\[0\]=resnet34"):
        check_student_sizes("resnet18", ["resnet34", "resnet18"], 10)
