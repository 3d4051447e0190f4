"""The training objectives, by the name a pipeline YAML gives them (`teacher.method`,
`students.method`). Each is one file; none imports Ray or MLflow (see `base.py`)."""

from selftrain.errors import ConfigError
from selftrain.methods.base import Batch, Comm, Method
from selftrain.methods.dash import Dash
from selftrain.methods.entropy_min import EntropyMin
from selftrain.methods.fixmatch import FixMatch
from selftrain.methods.flexmatch import FlexMatch
from selftrain.methods.freematch import FreeMatch
from selftrain.methods.kd import KnowledgeDistillation
from selftrain.methods.mean_teacher import MeanTeacher
from selftrain.methods.online_pseudo_label import PseudoLabel
from selftrain.methods.softmatch import SoftMatch
from selftrain.methods.supervised import Supervised
from selftrain.methods.tf_kd import TeacherFreeKD
from selftrain.methods.uda import UDA

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    # Noisy Student's objective is supervised cross-entropy on labeled + pseudo-labeled rows
    # (Xie et al. 2020, Eq. 2); the pipeline builds that stream for a student.
    "noisy_student": Supervised,
    "kd": KnowledgeDistillation,
    "tf_kd": TeacherFreeKD,
    "pseudo_label": PseudoLabel,
    "fixmatch": FixMatch,
    "flexmatch": FlexMatch,
    "freematch": FreeMatch,
    "softmatch": SoftMatch,
    "dash": Dash,
    "mean_teacher": MeanTeacher,
    "uda": UDA,
    "entropy_min": EntropyMin,
}



def check_knobs(role: str, method: str, knobs: list[str]) -> None:
    """Refuse a knob that `method` never reads (a sweep over it would train identical trials).
    `mu` is the config's for every method; `ema_decay` is read by the base class for all."""
    reads = set(METHODS[method].defaults) | {"ema_decay", "mu"}
    unread = sorted(set(knobs) - reads)
    if unread:
        raise ConfigError(f"{', '.join(f'{role}.{k}' for k in unread)}: method {method!r} does not read "
                          f"{'this knob' if len(unread) == 1 else 'these knobs'}; it reads: "
                          f"{', '.join(sorted(reads))}")


__all__ = ["METHODS", "Batch", "Comm", "Method", "check_knobs"]
