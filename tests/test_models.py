import pytest
import torch
from torchvision.ops import StochasticDepth

from selftrain.errors import ConfigError
from selftrain.models.backbone import strip_classifier
from selftrain.models.inference import fold_batchnorm
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


# --- small-image backbones (selftrain.models.small) ---

SMALL = ["wrn_28_2", "wrn_28_8", "resnet18_cifar", "cnn_small", "cnn_tiny"]


@pytest.mark.parametrize("name", SMALL)
def test_small_models_classify_24_and_32_px_with_noise_off_in_eval(name):
    # One build per model keeps this fast on a 2-core laptop (wrn_28_8 has 23M parameters).
    model = build_model(name, num_classes=5, dropout=0.3, stochastic_depth=0.2).eval()
    with torch.no_grad():
        for size in (24, 32):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 5)
        x = torch.randn(2, 3, 24, 24)
        assert torch.equal(model(x), model(x))  # eval mode: dropout and stochastic depth are off
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())
    assert set(SMALL) <= set(available_models())


def test_wrn_28_2_parameter_count_matches_the_architecture():
    def conv(cin, cout, k):  # no bias
        return cin * cout * k * k

    def bn(c):  # weight + bias
        return 2 * c

    def block(cin, cout):  # pre-activation basic block, 1x1 shortcut when the width changes
        shortcut = conv(cin, cout, 1) if cin != cout else 0
        return bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + shortcut

    widths = [16, 32, 64, 128]  # stem, then 16k, 32k, 64k with k = 2
    expected = conv(3, 16, 3)
    for g in range(3):
        expected += block(widths[g], widths[g + 1]) + 3 * block(widths[g + 1], widths[g + 1])
    expected += bn(128) + 128 * 10 + 10
    assert parameter_count("wrn_28_2", 10) == expected == 1_467_610
    assert 1_400_000 <= expected <= 1_550_000


def test_wrn_stochastic_depth_decays_linearly_over_its_12_blocks():
    model = build_model("wrn_28_2", 10, stochastic_depth=0.2)
    probs = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(probs) == 12
    assert probs == pytest.approx([0.2 * i / 11 for i in range(12)])
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.2)
    # cnn_small has no residual blocks: it accepts and ignores stochastic depth.
    assert not any(isinstance(m, StochasticDepth) for m in build_model("cnn_small", 10, 0.1, 0.5).modules())


def test_resnet18_cifar_keeps_32_px_into_layer1_unlike_torchvision():
    def layer1_input_size(model):
        seen = []
        handle = model.layer1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2:]))
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 32, 32))
        handle.remove()
        return tuple(seen[0])

    model = build_model("resnet18_cifar", 10, dropout=0.1, stochastic_depth=0.2)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert layer1_input_size(model) == (32, 32)
    assert layer1_input_size(build_model("resnet18", 10)) == (8, 8)  # 7x7/2 conv + max pool
    # The registry's torchvision-ResNet noise applies: 8 blocks, linear decay to 0.2.
    probs = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(probs) == 8 and probs[0] == 0.0 and probs[-1] == pytest.approx(0.2)


def test_wrn_student_size_check():
    check_student_sizes("wrn_28_2", ["wrn_28_8"], 10)
    message = (r"model.students\[0\]=wrn_28_2 \(1,467,610 parameters\) is smaller than "
               r"model.teacher=wrn_28_8 \(23,354,842\); a student must be equal or larger")
    with pytest.raises(ConfigError, match=message):
        check_student_sizes("wrn_28_8", ["wrn_28_2"], 10)


# --- batch norm folded for inference (`models.inference`) ------------------------------------

def _batch_norms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def _with_trained_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Every batch norm given running statistics and an affine map far from the identity, as a
    trained model's are: a fold that dropped any of the four would change the outputs."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


# (model, its batch norms, those left: wrn_28_2's 11 pre-activation norms that read a block's input
# (which the shortcut reads too) and the last one after the final addition; the first block's
# reads the stem convolution alone and is folded)
@pytest.mark.parametrize("name,norms,left", [("cnn_tiny", 6, 0), ("resnet18", 20, 0), ("wrn_28_2", 25, 12),
                                            ("efficientnet_b0", 49, 0)])
def test_folding_batch_norm_keeps_the_function_and_drops_the_norms(name, norms, left):
    model = _with_trained_statistics(build_model(name, 10))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(x)
        folded_model = fold_batchnorm(model)
        folded = folded_model(x)
    assert (_batch_norms(model), _batch_norms(folded_model)) == (norms, left)
    assert not folded_model.training
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)
    # The submodules keep their names: the backbone's features are found as in the plain model.
    with torch.inference_mode():
        features = strip_classifier(model)[0](x)
        torch.testing.assert_close(strip_classifier(folded_model)[0](x), features, rtol=1e-4, atol=1e-4)
    # ... a tolerance that catches a fold which lost the statistics: with them reset, the features move.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    with torch.inference_mode():
        assert (model(x) - features).abs().max() > 1e-2


class _InputDependent(torch.nn.Module):
    """A convolution and batch norm behind a branch on the input's values: not traceable."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_a_model_that_cannot_be_traced_is_scored_unfolded_with_a_warning():
    model = _InputDependent().eval()
    with pytest.warns(UserWarning, match=r"not folded into _InputDependent's convolutions: it cannot be traced"):
        assert fold_batchnorm(model) is model


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match=r"SmallCNN is in training mode"):
        fold_batchnorm(build_model("cnn_tiny", 3).train())
