"""The one typed home for every default, and strict loading of pipeline YAML.

A pipeline file is YAML whose keys mirror `PipelineConfig`; command-line overrides are
`dotted.key=value` pairs whose values are parsed as YAML scalars (`iterations=3` is an int,
`data.test=/x` a string). Loading is strict: an unknown key, a wrong type or a value out of
range raises `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selftrain.errors import ConfigError

BUILTIN_DATASETS = ("digits", "cifar10", "stl10", "svhn")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; ML configs mean a float. Resolve it as one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataConfig(_Strict):
    """Where the images come from. Either three paths, or a built-in dataset name."""

    labeled: str | None = Field(None, description="folder with one subfolder per class")
    unlabeled: str | None = Field(
        None, description="folder tree of images (any nesting), a glob, or Parquet file/folder; "
        "local, or a URI read through pyarrow filesystems (file://, s3://, gs://)"
    )
    test: str | None = Field(None, description="folder with one subfolder per class")
    builtin: Literal["digits", "cifar10", "stl10", "svhn"] | None = Field(
        None, description="used when labeled/unlabeled/test are not given"
    )
    cache_dir: str = Field("~/.cache/selftrain", description="where built-in datasets are written")
    labels_per_class: int = Field(
        10, ge=1, description="built-in only: labeled images per class; the rest of the "
        "training split becomes the unlabeled pool"
    )
    image_size: int = Field(32, ge=8, le=1024, description="models see image_size x image_size")
    parquet_image_column: str = Field("image", description="bytes column of a Parquet pool")
    unlabeled_has_class_folders: bool = Field(
        False, description="the pool's parent folders are class names: report pseudo-label accuracy"
    )

    @model_validator(mode="after")
    def _paths_or_builtin(self) -> DataConfig:
        given = {k: getattr(self, k) for k in ("labeled", "unlabeled", "test")}
        if all(given.values()):
            # The user's folders win; drop the built-in so the logged config says what ran.
            object.__setattr__(self, "builtin", None)
        elif any(given.values()):
            missing = [f"data.{k}" for k, v in given.items() if not v]
            raise ValueError(f"{', '.join(missing)} must be set too when one data path is given")
        elif self.builtin is None:
            raise ValueError(
                "set data.labeled, data.unlabeled and data.test, or data.builtin "
                f"(one of {', '.join(BUILTIN_DATASETS)})"
            )
        return self


class ModelConfig(_Strict):
    teacher: str = Field("resnet18", description="architecture of the first teacher: a small-image one "
                         "(cnn_tiny, cnn_small, wrn_28_2, wrn_28_8, resnet18_cifar) or a torchvision one (resnet18, ...)")
    students: list[str] = Field(
        default_factory=lambda: ["resnet18"],
        min_length=1,
        description="student i uses students[i-1] (the last one repeats); each must be at least "
        "as large as the model before it",
    )

    init: str = Field(
        "auto", min_length=1, description="the teacher's starting weights: pretrain (the backbone the "
        "`pretrain:` stage trains), a saved model directory (its backbone: every weight but the "
        "classifier's), none (random), or auto (pretrain when there is a `pretrain:` section, else none)")

    def student(self, iteration: int) -> str:
        return self.students[min(iteration, len(self.students)) - 1]

    def teacher_of(self, iteration: int) -> str:
        """The architecture that teaches student `iteration` (the previous student, or the teacher)."""
        return self.teacher if iteration == 1 else self.student(iteration - 1)


class NoiseConfig(_Strict):
    """The student's noise (Noisy Student, Xie et al. 2020, Sec. 2): input and model noise."""

    randaugment_num_ops: int = Field(2, ge=0, le=10)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="before the classifier")
    stochastic_depth: float = Field(
        0.2, ge=0.0, lt=1.0, description="drop probability of the last block (linear decay)"
    )
    horizontal_flip: bool = Field(True, description="off for digits and text")


class TrainConfig(_Strict):
    teacher_epochs: int = Field(30, ge=1)
    student_epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    teacher_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: when the cluster has GPUs")
    amp: bool = Field(True, description="bfloat16 autocast on GPU")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker; default: Ray's (floor of cpus_per_worker)"
    )
    data_cpus_per_task: float = Field(
        0.5, gt=0.0, description="CPUs of each Ray Data task feeding training (read, decode, augment); "
        "must fit beside the workers, or the data tasks wait forever"
    )
    shuffle_buffer: int = Field(2048, ge=0, description="rows in each worker's shuffle buffer")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (and the last): "
                                  "what a restarted worker group or a re-run loses at most")
    max_failures: int | None = Field(
        None, ge=0, description="times Ray Train restarts a failed worker group (a lost node, a killed "
        "worker) within one run, each time from the last checkpoint; default: 3 on a multi-node "
        "cluster, 0 on a single machine, where a failure is a bug to see at once")
    student_init: Literal["scratch", "teacher"] = Field(
        "scratch", description="a student starts from random weights (Noisy Student's default), or "
        "from its teacher's weights (same architecture only): it starts above chance, so a sweep's "
        "early stopping compares trials on signal from the first epoch")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="optimizer steps per epoch; default: one pass over the labeled (+ "
        "pseudo-labeled) rows, or for an online method one pass over the unlabeled pool")
    backbone_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="a teacher on a pretrained or saved backbone (model.init): "
        "the backbone's learning rate is train.lr times this, the new classifier's train.lr "
        "(discriminative fine-tuning: a low scale keeps more of what pretraining learned)")
    head_init: Literal["random", "linear_probe"] = Field(
        "random", description="a teacher on a pretrained or saved backbone (model.init): its new "
        "classifier starts from random weights, or from a linear probe fitted on the labeled images' "
        "frozen features (LP-FT, Kumar et al. 2022)")


PRETRAIN_METHOD_NAMES = ("simclr", "moco_v2", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "rotation", "jigsaw")


class PretrainConfig(_Strict):
    """Self-supervised pretraining of the teacher's backbone on the unlabeled pool, before the
    teacher (`pretraining/`). A knob left unset takes the method's default (`defaults` in
    `pretraining/<method>.py`); a knob the method does not read is refused."""

    method: Literal[PRETRAIN_METHOD_NAMES] = Field(..., description=", ".join(PRETRAIN_METHOD_NAMES))
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2, description="pool images per step per worker (two views each)")
    lr: float = Field(0.06, gt=0.0, description="peak learning rate, cosine schedule")
    weight_decay: float = Field(5e-4, ge=0.0)
    optimizer: Literal["sgd", "lars"] = Field(
        "sgd", description="sgd: momentum 0.9, Nesterov; lars: LARS (You et al. 2017; lightly's), momentum 0.9, "
        "each weight's step scaled by 0.001 |w| / |g|, biases and norm layers unscaled and not decayed, as "
        "Barlow Twins and VICReg train")
    steps_per_epoch: int | None = Field(None, ge=1, description="default: one pass over the pool")
    crop_scale_min: float = Field(0.2, gt=0.0, le=1.0, description="smallest random-resized-crop area "
                                  "of a view (SimCLR's CIFAR setting 0.08-0.2; digits need more)")
    color_jitter: float = Field(0.4, ge=0.0, le=1.0, description="brightness/contrast/saturation "
                                "jitter strength of the views (hue: a quarter of it), applied with p=0.8")
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="random rotation of each view, up to "
                            "this many degrees either way, before the crop (0: none; digits: 15)")
    shear: float = Field(0.0, ge=0.0, lt=90.0, description="random shear of each view, degrees either way (digits: 10)")
    translate: float = Field(0.0, ge=0.0, le=0.5, description="random shift of each view, up to this "
                             "fraction of its side (digits: 0.1)")
    knn_k: int = Field(200, ge=1, description="neighbours of the per-epoch kNN monitor")
    knn_temperature: float = Field(0.1, gt=0.0, description="vote weight exp(similarity / T)")
    knn_queries: int = Field(2000, ge=1, description="test images the per-epoch kNN monitor classifies "
                             "(a fixed sample when the test set is larger)")
    temperature: float | None = Field(None, gt=0.0, description="simclr 0.5, moco_v2 0.2, dino's student 0.1")
    momentum: float | None = Field(None, ge=0.0, lt=1.0, description="momentum encoder's decay (moco_v2 "
                                   "0.99 constant; byol 0.99 and dino 0.996, cosine-scheduled to 1)")
    queue_size: int | None = Field(None, ge=1, description="moco_v2: negatives kept from earlier batches (4096)")
    projection_dim: int | None = Field(None, ge=1, description="width of the projection head's output")
    hidden_dim: int | None = Field(None, ge=1, description="width of the heads' hidden layers")
    redundancy_weight: float | None = Field(None, ge=0.0, description="barlow_twins: λ of the off-diagonal terms (5e-3)")
    invariance_weight: float | None = Field(None, ge=0.0, description="vicreg: 25")
    variance_weight: float | None = Field(None, ge=0.0, description="vicreg: 25")
    covariance_weight: float | None = Field(None, ge=0.0, description="vicreg: 1")
    prototypes: int | None = Field(None, ge=2, description="dino: output width K (1024)")
    teacher_temperature: float | None = Field(None, gt=0.0, description="dino: 0.04")
    center_momentum: float | None = Field(None, ge=0.0, lt=1.0, description="dino: 0.9")
    permutations: int | None = Field(None, ge=2, description="jigsaw: size of the permutation set (64)")
    grid: int | None = Field(None, ge=2, le=4, description="jigsaw: tiles per side (3)")

    def knobs(self) -> dict:
        """The method's knobs that are set (unset ones take the method's default)."""
        return {k: v for k, v in self.model_dump().items() if k in PRETRAIN_KNOBS and v is not None}


# The fields of PretrainConfig that are a method's knobs (the rest configure the stage).
PRETRAIN_KNOBS = ("temperature", "momentum", "queue_size", "projection_dim", "hidden_dim", "redundancy_weight",
                  "invariance_weight", "variance_weight", "covariance_weight", "prototypes",
                  "teacher_temperature", "center_momentum", "permutations", "grid")


class PseudoLabelConfig(_Strict):
    threshold: float = Field(0.5, ge=0.0, lt=1.0, description="keep teacher confidence >= this")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="soft target = softmax(z/T)")
    soft: bool = Field(True, description="soft targets; false: one-hot of the argmax")
    balance: bool = Field(True, description="top-k per class, duplicating short classes")
    per_class: int | None = Field(
        None, ge=1, description="k for balancing; default: the median kept count per class"
    )


class ScoringConfig(_Strict):
    """Teacher inference over the pool (and the test set). The defaults suit both a laptop
    (one CPU actor) and a GPU node (one actor per GPU, bf16 autocast, channels_last)."""

    batch_size: int = Field(256, ge=1, le=65536, description="images per forward pass")
    num_actors: int | Literal["auto"] = Field(
        "auto", description="inference actors; auto: one per gpus_per_actor GPUs of the cluster "
        "when scoring on GPUs, else 1 (a CPU actor already uses every core it is given)"
    )
    cpus_per_actor: float = Field(1.0, gt=0.0, le=256.0, description="CPUs reserved per actor")
    gpus_per_actor: float = Field(
        1.0, gt=0.0, le=8.0, description="GPUs per actor when scoring on GPUs (fractions share one)"
    )
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: when the cluster has GPUs")
    concurrent_batches: int | Literal["auto"] = Field(
        "auto", description="batches each actor works on at once, in its own threads: on a GPU each "
        "has its own CUDA stream, so one batch's host work (Ray's batching, the copy to the device) "
        "overlaps another's compute; auto: 4 when scoring on GPUs, else 1 (a CPU actor's forward "
        "pass already uses every core it is given)"
    )
    amp: bool = Field(True, description="bfloat16 autocast on GPU")
    channels_last: bool = Field(True, description="channels_last memory format on GPU")
    max_rejected_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="stop after scoring when more than this fraction of the "
        "pool's files is unreadable (the scores stay on disk); 1.0 never stops"
    )
    tta: list[Literal["flip", "shift", "scale"]] = Field(
        [], description="test-time transforms the teacher scores each pool image under, its softmax "
        "probabilities averaged over the views (data distillation, Radosavovic et al. 2018); the plain "
        "image is always a view. flip: the horizontal mirror (not for digits/text, where a mirror is "
        "another symbol); shift: 4 crops shifted by image_size//8 px up/down/left/right, reflect-padded; "
        "scale: a 1.125x zoom-in centre crop and a 0.875x zoom-out, reflect-padded. The pool only, never "
        "the test set; empty = the plain image. Each view is one more forward pass over the pool"
    )

    @model_validator(mode="after")
    def _tta_unique(self) -> ScoringConfig:
        repeated = sorted({t for t in self.tta if self.tta.count(t) > 1})
        if repeated:
            raise ValueError(f"scoring.tta lists {', '.join(map(repr, repeated))} more than once "
                             f"(got {self.tta}); name each transform at most once")
        return self

    @model_validator(mode="after")
    def _counts_positive(self) -> ScoringConfig:
        if self.num_actors != "auto" and self.num_actors < 1:
            raise ValueError(f"num_actors must be 'auto' or at least 1 (got {self.num_actors})")
        if self.concurrent_batches != "auto" and self.concurrent_batches < 1:
            raise ValueError(f"concurrent_batches must be 'auto' or at least 1 (got {self.concurrent_batches})")
        return self


class RegistryConfig(_Strict):
    """The MLflow Model Registry: where the final model of each finished pipeline is registered."""

    model_name: str | None = Field(
        None, min_length=1, pattern=r"^[^/:'\"]+$", description="registered model whose new version each "
        "finished pipeline's final model becomes, tagged with its test accuracy; its alias `best` points at "
        "the version with the highest test accuracy (a worse re-run does not move it); default: the "
        "experiment name (`name`, with any / : or quote replaced by -, which MLflow does not allow)")


METHOD_NAMES = ("supervised", "noisy_student", "pseudo_label", "fixmatch", "flexmatch", "freematch",
                "softmatch", "dash", "mean_teacher", "uda", "entropy_min", "kd", "tf_kd")
ONLINE_METHODS = ("pseudo_label", "fixmatch", "flexmatch", "freematch", "softmatch", "dash",
                  "mean_teacher", "uda", "entropy_min")  # these read the unlabeled pool every step


class MethodConfig(_Strict):
    """The objective a model trains with, and its knobs. A knob left unset (null) takes the
    method's paper default (`methods/<method>.py`, `defaults`); the resolved values are logged.

    Online methods (ONLINE_METHODS) read a second stream every step: μ·batch_size unlabeled pool
    images, each as a weak and a strong view. On a student, the first stream is labeled +
    pseudo-labeled rows, so `students.method: fixmatch` adds FixMatch's consistency term on the
    pool to Noisy Student's pseudo-labels.
    """

    method: Literal[METHOD_NAMES] = Field("supervised", description=", ".join(METHOD_NAMES))
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="confidence threshold τ "
                                    "(pseudo_label, fixmatch, flexmatch: 0.95; uda: 0.8)")
    lambda_u: float | None = Field(None, ge=0.0, description="weight of the unlabeled loss "
                                   "(1.0; mean_teacher 50; entropy_min 0.1)")
    mu: int = Field(7, ge=1, le=64, description="unlabeled images per labeled image in a step")
    temperature: float | None = Field(None, gt=0.0, le=100.0, description="uda: sharpening T of the "
                                      "weak view's targets (0.4); kd, tf_kd: distillation T (4.0)")
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0, description="EMA of the weights, used for "
                                    "evaluation and saved as the model (online methods: 0.999); 0 = off")
    unsup_warmup: float | None = Field(None, ge=0.0, le=1.0, description="fraction of the steps over "
                                       "which the unlabeled weight ramps up from 0 (pseudo_label, "
                                       "mean_teacher: 0.4); dash: supervised-only warm-up fraction")
    threshold_warmup: bool | None = Field(None, description="flexmatch: count not-yet-confident images "
                                          "in the normaliser (the paper's warm-up; true)")
    stats_momentum: float | None = Field(None, ge=0.0, lt=1.0, description="freematch, softmatch, "
                                         "distribution alignment: EMA momentum of running statistics (0.999)")
    n_sigma: float | None = Field(None, gt=0.0, description="softmatch: width of the Gaussian weight (2.0)")
    fairness_weight: float | None = Field(None, ge=0.0, description="freematch: weight of the "
                                          "self-adaptive fairness term (0.01)")
    distribution_alignment: bool | None = Field(None, description="softmatch: uniform distribution "
                                                "alignment, p <- normalise(p * p_target / p_model) (true)")
    dash_gamma: float | None = Field(None, gt=1.0, description="dash: ρ_t = max(C·γ^(-t)·ρ_0, ρ_min) (1.27)")
    dash_c: float | None = Field(None, gt=0.0, description="dash: C (1.0001)")
    dash_rho_min: float | None = Field(None, ge=0.0, description="dash: ρ_min (0.05)")
    dash_update_every: int | None = Field(None, ge=1, description="dash: steps between ρ_t updates (t += 1)")
    tsa: Literal["none", "linear", "log", "exp"] | None = Field(
        None, description="uda: training-signal annealing of the labeled loss (none)")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="kd, tf_kd: weight of the "
                                "distillation term against cross-entropy (kd 0.9, tf_kd 0.5)")
    virtual_correct: float | None = Field(None, gt=0.0, lt=1.0, description="tf_kd: probability the "
                                          "virtual teacher puts on the correct class (0.9)")
    max_empty_epochs: int = Field(3, ge=1, description="stop when no unlabeled image passes the mask "
                                  "for this many epochs in a row (a warning each epoch before)")
    collapse_fraction: float = Field(0.9, gt=0.0, le=1.0, description="warn when one class holds more "
                                     "than this share of an epoch's pseudo-labels; stop after "
                                     "max_empty_epochs such epochs in a row")

    def knobs(self) -> dict:
        """The knobs a method reads (unset ones omitted: the method's default applies)."""
        skip = {"method", "max_empty_epochs", "collapse_fraction"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}

    @property
    def online(self) -> bool:
        return self.method in ONLINE_METHODS


def _teacher_method() -> MethodConfig:
    return MethodConfig(method="supervised")


def _student_method() -> MethodConfig:
    return MethodConfig(method="noisy_student")


class PipelineConfig(_Strict):
    name: str = Field("selftrain", min_length=1, description="MLflow experiment name")
    iterations: int = Field(2, ge=0, description="number of students, each the next teacher; 0 trains the teacher only")
    seed: int = 0
    output_dir: str = "runs/selftrain"
    data: DataConfig = Field(default_factory=lambda: DataConfig(builtin="digits"))
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig | None = Field(None, description="self-supervised pretraining of the teacher's "
                                            "backbone on the pool, before the teacher (none: skipped)")
    teacher: MethodConfig = Field(default_factory=_teacher_method, description="how the first teacher trains")
    students: MethodConfig = Field(default_factory=_student_method, description="how every student trains")
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pseudo_label: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    baseline: bool = Field(True, description="beside a teacher that learns from the pool (an online "
                           "method), also train the teacher's architecture supervised on the labeled "
                           "images alone, so the summary shows what the pool added; nothing extra when "
                           "the teacher is supervised already")

    @property
    def registered_model_name(self) -> str:
        """`registry.model_name`, else the experiment name made a valid registered-model name."""
        return self.registry.model_name or re.sub(r"[/:'\"]", "-", self.name)

    @property
    def teacher_init(self) -> str:
        """`model.init` resolved: pretrain, none, or a model directory."""
        if self.model.init == "auto":
            return "pretrain" if self.pretrain else "none"
        return self.model.init

    @model_validator(mode="after")
    def _init_needs_pretrain(self) -> PipelineConfig:
        if self.model.init == "pretrain" and self.pretrain is None:
            raise ValueError("model.init=pretrain needs a `pretrain:` section (pretrain.method: simclr, ...); "
                             "or set model.init to none or to a saved model directory")
        return self

    @model_validator(mode="after")
    def _student_init_needs_equal_architectures(self) -> PipelineConfig:
        if self.train.student_init == "teacher":
            for i in range(1, self.iterations + 1):
                if self.model.student(i) != self.model.teacher_of(i):
                    raise ValueError(
                        f"train.student_init=teacher needs each student to have its teacher's architecture, "
                        f"but student {i} is {self.model.student(i)} and its teacher {self.model.teacher_of(i)} "
                        "(model.students); use train.student_init=scratch or equal architectures")
        return self


DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


class SearchDomain(_Strict):
    """One swept key: exactly one of grid / choice (lists of values) or uniform / loguniform /
    randint (`[low, high]`; randint's high is exclusive, as in Ray Tune)."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDomain:
        given = [name for name in DOMAINS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAINS)} (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: low must be below high (got {list(value)})")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {value[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DOMAINS if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any]:
        """Values worth validating against the config: every listed one, or the bounds."""
        value = getattr(self, self.kind)
        return list(value) if self.kind in ("grid", "choice") else [value[0], value[1] - (self.kind == "randint")]


class SweepConfig(_Strict):
    """The `sweep:` section of a sweep YAML: what to vary and how trials are scheduled."""

    space: dict[str, SearchDomain] = Field(
        default_factory=dict, description="dotted config key -> domain, e.g. "
        "pseudo_label.threshold: {grid: [0.3, 0.7]}")
    num_samples: int = Field(1, ge=1, description="samples of the space (each grid point this often)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: as many as the cluster's CPUs/GPUs fit, given train.*")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops losing trials early")
    grace_period: int = Field(2, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor at each rung")
    validation_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="labeled images per class held out as the objective's "
        "validation split (at least one per class); the test set is never used to choose")
    reuse_teacher_scores: bool = Field(
        True, description="trials share one teacher pass over the pool; false re-scores it per "
        "trial (the naive sweep, for comparison)")
    trial_cpus: float = Field(0.0, ge=0.0, description="CPUs of the trial process itself: it only "
                              "waits; its trainer and data tasks reserve their own (train.*)")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is already set to a value")
        node[leaf] = _yaml(raw) if raw != "" else None
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {error['msg']}{shown}"


def _allowed_keys(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return ", ".join(model.model_fields)


def build_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            line = _describe(err)
            if err["type"] == "extra_forbidden":
                line += f"; allowed: {_allowed_keys(err['loc'])}"
            lines.append(line)
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    raw = _read_yaml(path)
    if "sweep" in raw:
        raise ConfigError(f"{path} is a sweep (it has a 'sweep:' section): run it with `selftrain sweep {path}`")
    return build_config(_merge(raw, parse_overrides(overrides or [])), source=str(path))


def with_params(cfg: PipelineConfig, params: dict[str, Any], source: str = "trial") -> PipelineConfig:
    """`cfg` with dotted keys set, validated as strictly as a pipeline file."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build_config(_merge(cfg.model_dump(), tree), source=source)


def _section(annotation: Any) -> Any:
    """`X | None` -> X for an optional section (`pretrain:`); anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return annotation


def _check_key(key: str) -> None:
    model: type[BaseModel] = PipelineConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"sweep.space: unknown config key {key!r}; allowed under {where}: "
                              f"{', '.join(model.model_fields)}")
        annotation = _section(model.model_fields[part].annotation)
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1 and not nested:
            raise ConfigError(f"sweep.space: {key!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        if depth == len(parts) - 1 and nested:
            raise ConfigError(f"sweep.space: {key!r} is a section; sweep one of its keys: "
                              f"{', '.join(f'{key}.{k}' for k in annotation.model_fields)}")
        model = annotation if nested else model


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineConfig, SweepConfig]:
    """A sweep file: a pipeline plus a `sweep:` section. Every swept key must exist and every
    listed value (or range bound) must be valid for it, before anything runs."""
    raw = _merge(_read_yaml(path), parse_overrides(overrides or []))
    if not isinstance(raw.get("sweep"), dict):
        raise ConfigError(f"{path}: no 'sweep:' section; a sweep file is a pipeline plus sweep: {{space: …}}")
    sweep_raw = raw.pop("sweep")
    cfg = build_config(raw, source=str(path))
    try:
        sweep = SweepConfig.model_validate(sweep_raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"invalid sweep section of {path}:\n  sweep." + "\n  sweep.".join(lines)) from None
    if not sweep.space:
        raise ConfigError(f"{path}: sweep.space is empty; give at least one key, e.g. "
                          "pseudo_label.threshold: {grid: [0.3, 0.7]}")
    for key, domain in sweep.space.items():
        _check_key(key)
        for value in domain.values:
            with_params(cfg, {key: value}, source=f"sweep.space[{key!r}] ({domain.kind} value {value!r})")
    return cfg, sweep


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                 defaults: dict[str, Any] | None = None) -> list[str]:
    """Human-readable differences between two config dumps: `key: old -> new`.

    With `defaults` (a dump of the defaults), a key that `old` lacks and `new` holds at its
    default is no difference: `old` was written by a selftrain from before that key existed,
    which behaved as the default does."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        default = (defaults or {}).get(key, _NO_DEFAULT)
        if key not in old and key in new and defaults is not None and b == default:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, f"{name}.", default if isinstance(default, dict) else None)
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


_NO_DEFAULT = object()


def _bounds(field: Any) -> str:
    """A field's allowed range from its constraints (`ge=0, lt=1` -> `>= 0, < 1`) or Literal choices."""
    import annotated_types as at

    parts = []
    for item in field.metadata:
        for kind, attr, symbol in ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="),
                                   (at.Lt, "lt", "<"), (at.MinLen, "min_length", "min length")):
            if isinstance(item, kind):
                parts.append(f"{symbol} {getattr(item, attr)}")
    choices = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is Literal]
    if typing.get_origin(field.annotation) is Literal:
        choices = [field.annotation]
    for literal in choices:
        values = [str(v) for v in typing.get_args(literal)]
        if not all(v in (field.description or "") for v in values):  # not already in the description
            parts.append("one of " + ", ".join(values))
    return "; ".join(parts)


def describe_config(cfg: BaseModel, prefix: str = "") -> list[str]:
    """Every key of a resolved config, dotted, as `key: value  # default ...; range; description`
    (`selftrain config show`). Nested sections recurse; a value that differs from the default is
    marked `*`."""
    lines = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        default = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            if default is None:  # an optional section that is set (`pretrain:`): a line of its own too
                lines.append(f"* {key}: (set)  # default None; {field.description or ''}")
            lines += describe_config(value, f"{key}.")
            continue
        notes = ["required" if field.is_required() else f"default {default!r}"] + [
            n for n in (_bounds(field), field.description or "") if n]
        changed = "*" if value != default else " "
        lines.append(f"{changed} {key}: {value!r}  # " + "; ".join(notes))
    return lines
