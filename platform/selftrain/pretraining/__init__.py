"""Self-supervised pretraining methods, by the name `pretrain.method` gives them. Each is one
file with the paper's formula; losses and heads come from lightly. None imports Ray or MLflow."""

from selftrain.errors import ConfigError
from selftrain.pretraining.barlow_twins import BarlowTwins
from selftrain.pretraining.base import Network, PretrainMethod
from selftrain.pretraining.byol import BYOL
from selftrain.pretraining.dino import DINO
from selftrain.pretraining.jigsaw import Jigsaw
from selftrain.pretraining.moco import MoCoV2
from selftrain.pretraining.rotation import Rotation
from selftrain.pretraining.simclr import SimCLR
from selftrain.pretraining.simsiam import SimSiam
from selftrain.pretraining.vicreg import VICReg

PRETRAIN_METHODS: dict[str, type[PretrainMethod]] = {
    "simclr": SimCLR,
    "moco_v2": MoCoV2,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "dino": DINO,
    "rotation": Rotation,
    "jigsaw": Jigsaw,
}


def check_pretrain_knobs(method: str, knobs: list[str]) -> None:
    """Refuse a `pretrain.<knob>` that `method` never reads."""
    reads = set(PRETRAIN_METHODS[method].defaults)
    unread = sorted(set(knobs) - reads)
    if unread:
        raise ConfigError(f"{', '.join(f'pretrain.{k}' for k in unread)}: pretraining method {method!r} does not "
                          f"read {'this knob' if len(unread) == 1 else 'these knobs'}; it reads: "
                          f"{', '.join(sorted(reads)) or 'none'}")


__all__ = ["PRETRAIN_METHODS", "Network", "PretrainMethod", "check_pretrain_knobs"]
