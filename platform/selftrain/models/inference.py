"""A saved model made ready for inference: each batch norm that follows a convolution folded into it.

In eval mode a batch norm is a fixed per-channel affine map, so when it reads a convolution's
output (and nothing else reads that output) it can be folded into the convolution's weights
and bias: one op less per pair, the same function up to rounding. ResNets and EfficientNets are
built of such pairs (ResNet-50: 53), as are the pre-activation WideResNets inside each block.
The fold is torch's own (`torch.fx.experimental.optimization.fuse`: symbolic tracing, then
`fuse_conv_bn_eval` per pair).

Every scoring actor uses it (`stages.score.TeacherScorer`: the pool pass, the test set,
`selftrain predict`, the features of `selftrain eval`), and so does the scoring bench's bare
loop. The bench's bare loop on one CPU thread, median of 5, two rounds: resnet18 at 32 px
1,488-1,554 -> 1,574-1,599 img/s, wrn_28_2 299-305 -> 311-314, efficientnet_b0 at 64 px
639-649 -> 789-801 (see the README). On a GPU it drops a kernel launch per pair, and launching
kernels under the GIL is where a GPU scoring actor's threads spent a quarter of their time
(py-spy on an H200); not yet measured there.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.fx.experimental.optimization import fuse

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """`model` (in eval mode) with every batch norm that directly follows a convolution (or a
    linear layer) folded into it: a new module (a `torch.fx.GraphModule`; `model` is left as it
    was) that keeps the submodules' names, so `models.backbone` still finds the classifier.

    A model without batch norm comes back as it is. So does one that cannot be traced
    symbolically (control flow that depends on the input), with a warning naming why: it still
    scores, at its unfolded speed."""
    if model.training:
        raise ValueError(f"fold_batchnorm: {type(model).__name__} is in training mode; folding uses the "
                         "running statistics, which only eval mode scores with (call .eval() first)")
    if not any(isinstance(module, BATCH_NORMS) for module in model.modules()):
        return model
    try:
        return fuse(model).eval()
    except Exception as error:  # noqa: BLE001 - fx raises many kinds; the model is still usable unfolded
        warnings.warn(f"batch norm not folded into {type(model).__name__}'s convolutions: it cannot be "
                      f"traced symbolically ({type(error).__name__}: {error}); scoring it unfolded", stacklevel=2)
        return model
