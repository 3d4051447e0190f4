"""Teacher inference with Ray Data: decode on CPU tasks, score in an actor pool, stream out.

Used for the unlabeled pool (written as Parquet, never collected on the driver) and for the
test set. The teacher runs un-noised (eval mode, no augmentation), as Noisy Student requires
(Xie et al. 2020, Sec. 2: "the teacher is not noised ... so the pseudo labels are accurate").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy

from selftrain.config import ScoringConfig
from selftrain.data.augment import nhwc_to_nchw, to_model_input
from selftrain.data.decode import decode_batch, load_batch
from selftrain.errors import DataError
from selftrain.methods.pseudo_label import confidence
from selftrain.training.loop import load_model

ROWS_PER_SCORES_FILE = 50_000  # Parquet shards of the scores: a 1M-image pool -> ~20 files
EXAMPLES = 5  # unreadable files named in the error message


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def wants_gpu(setting: bool | str) -> bool:
    return cluster_has_gpus() if setting == "auto" else bool(setting)


def num_actors(cfg: ScoringConfig, use_gpu: bool) -> int:
    """`auto`: one actor per `gpus_per_actor` GPUs of the cluster; on CPU one actor, which
    already uses every core it is given (more actors would only split the same cores)."""
    if cfg.num_actors != "auto":
        return cfg.num_actors
    if not use_gpu:
        return 1
    return max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.gpus_per_actor))


class TeacherScorer:
    """Callable class for `map_batches`: one model per actor, loaded once."""

    def __init__(self, model_dir: str, use_gpu: bool, amp: bool, channels_last: bool):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model, self.spec = load_model(model_dir)
        self.on_gpu = self.device.type == "cuda"
        self.channels_last = channels_last and self.on_gpu
        self.amp = amp and self.on_gpu
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = batch["error"] == ""
        logits = np.zeros((len(ok), self.spec["num_classes"]), dtype=np.float32)
        if ok.any():
            images = torch.from_numpy(batch["image"][ok]).to(self.device, non_blocking=True)
            x = to_model_input(nhwc_to_nchw(images), channels_last=self.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits[ok] = self.model(x).float().cpu().numpy()
        prediction, conf = confidence(logits)
        prediction[~ok], conf[~ok] = -1, 0.0
        out = {key: value for key, value in batch.items() if key != "image"}
        out.update(logits=logits, prediction=prediction.astype(np.int64), confidence=conf.astype(np.float32))
        return out


def score(
    rows: ray.data.Dataset, model_dir: str, cfg: ScoringConfig, image_size: int,
    from_paths: bool, parquet_column: str = "image",
) -> ray.data.Dataset:
    """Lazy: `{path, bytes|.., ...}` rows -> `{path, ..., error, logits, prediction, confidence}`."""
    if from_paths:
        decoded = rows.map_batches(load_batch, fn_kwargs={"size": image_size, "parquet_column": parquet_column},
                                   batch_size=64, num_cpus=0.5)
    else:
        decoded = rows.map_batches(decode_batch, fn_kwargs={"size": image_size}, batch_size=64, num_cpus=0.5)
    return infer(decoded, model_dir, cfg)


def infer(decoded: ray.data.Dataset, model_dir: str, cfg: ScoringConfig, scorer: type = TeacherScorer,
          **scorer_kwargs: Any) -> ray.data.Dataset:
    """Lazy: decoded `{image, error, ...}` rows through the teacher's actor pool (`scorer`
    and `scorer_kwargs` let the bench swap in a GPU-decoding scorer on the same pool)."""
    use_gpu = wants_gpu(cfg.use_gpu)
    return decoded.map_batches(
        scorer,
        fn_constructor_kwargs={"model_dir": model_dir, "use_gpu": use_gpu, "amp": cfg.amp,
                               "channels_last": cfg.channels_last, **scorer_kwargs},
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(min_size=1, max_size=num_actors(cfg, use_gpu)),
        num_gpus=cfg.gpus_per_actor if use_gpu else 0,
        num_cpus=cfg.cpus_per_actor,
    )


def score_pool(pool: ray.data.Dataset, model_dir: str, cfg: ScoringConfig, image_size: int, out_dir: Path,
               pool_name: str = "data.unlabeled") -> str:
    """Score every pool image and write `{path, label, error, logits, prediction, confidence}`
    as sharded Parquet; then stop with DataError if the pool was empty or mostly unreadable."""
    scores_dir = out_dir / "scores"
    # Write tasks at half a CPU, as every other pool task: at Ray's default (1 CPU) they wait
    # behind the scoring actor and the decode tasks on a 2-core machine until decoding ends.
    score(pool, model_dir, cfg, image_size, from_paths=False).write_parquet(
        str(scores_dir), min_rows_per_file=ROWS_PER_SCORES_FILE, ray_remote_args={"num_cpus": 0.5})
    check_scores(str(scores_dir), cfg.max_rejected_fraction, pool_name)
    return str(scores_dir)


def _count(batch: pd.DataFrame) -> pd.DataFrame:
    bad = batch[batch["error"] != ""].head(EXAMPLES)
    return pd.DataFrame([{"rows": len(batch), "rejected": int((batch["error"] != "").sum()),
                          "examples": [f"{p} ({r})" for p, r in zip(bad["path"], bad["error"])]}])


def check_scores(scores_dir: str, max_rejected_fraction: float, pool_name: str) -> tuple[int, int]:
    """(rows, rejected) from one streaming pass over the scores' `path`/`error` columns.

    Ray writes no file for an empty dataset: an empty pool (a glob or prefix that matched
    nothing) is caught here, never trained on silently. The scores stay on disk either way."""
    written = Path(scores_dir)
    if not written.is_dir() or not any(written.glob("*.parquet")):
        raise DataError(f"{pool_name}: the pool holds no image files (nothing was scored)")
    rows, rejected, examples = 0, 0, []
    parts = ray.data.read_parquet(scores_dir).select_columns(["path", "error"]).map_batches(
        _count, batch_format="pandas")
    for part in parts.iter_rows():  # one small row per block
        rows, rejected = rows + int(part["rows"]), rejected + int(part["rejected"])
        examples = (examples + list(part["examples"]))[:EXAMPLES]
    if rows == 0:
        raise DataError(f"{pool_name}: the pool holds no image files (nothing was scored)")
    if rejected / rows > max_rejected_fraction:
        raise DataError(
            f"{pool_name}: {rejected} of {rows} pool files ({rejected / rows:.1%}) are unreadable, "
            f"more than scoring.max_rejected_fraction={max_rejected_fraction}; e.g. "
            + "; ".join(examples) + f". The scores are kept in {scores_dir}. Fix the pool, or raise "
            "scoring.max_rejected_fraction to go on without those files."
        )
    return rows, rejected
