"""Trained models as MLflow models, the Model Registry, and MODEL URIs back to model folders.

The other half of the MLflow layer (`tracking.py` holds runs, metrics, artifacts; the Tracker
calls these through its outage guard). A model is logged with `mlflow.pytorch.log_model`, so
`mlflow.pyfunc.load_model` and `mlflow models serve` take it: MLmodel, a tensor signature
(float32 N x C x H x W, normalised as `data.augment.to_model_input` makes it -> logits N x classes),
a real labeled image as input example, pinned pip requirements and the selftrain package as
code. selftrain's own `model.pt` + `model.json` ride along as `extra_files/`: `selftrain predict`
and `eval` rebuild the model from those two files in Ray actors, and never unpickle a model.

MLflow 3 stores a model as a LoggedModel of the experiment, linked to its run as an output;
`runs:/<run>/model` resolves to the run's newest LoggedModel named `model`. Everything here
names its run and experiment explicitly: no fluent active run whose exit would change a status,
and no LoggedModel left in experiment 0 (what `log_model(run_id=...)` does alone when no
experiment is active).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

MODEL_NAME = "model"  # the LoggedModel's name in its run: runs:/<run id>/model
SELFTRAIN_FILES = "extra_files"  # where model.pt + model.json sit inside a logged model
ACCURACY_TAG = "test_accuracy"
BEST_ALIAS = "best"
PACKAGE_DIR = Path(__file__).resolve().parent  # code_paths: a loaded model needs no install


def pip_requirements() -> list[str]:
    """torch and torchvision at the installed versions (MLflow adds itself). The local label
    (`+cu130`) is dropped, as MLflow does, so pip finds them on PyPI. Given, never inferred:
    inference loads the model in a subprocess and takes tens of seconds."""
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def mlflow_pytorch() -> ModuleType:
    """`mlflow.pytorch`, imported without pytorch_lightning: MLflow imports it at module load for
    its Lightning autologging (lightly's wheel installs it), 3-12 s here, and selftrain never
    autologs. Blocked, that import raises ImportError, which mlflow.pytorch catches."""
    if "mlflow.pytorch" in sys.modules or "pytorch_lightning" in sys.modules:
        import mlflow.pytorch
        return mlflow.pytorch
    sys.modules["pytorch_lightning"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import mlflow.pytorch
    except ImportError:  # a later MLflow that needs it: pay for the import
        del sys.modules["pytorch_lightning"]
        import mlflow.pytorch
    finally:
        sys.modules.pop("pytorch_lightning", None)
    return mlflow.pytorch


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars for the few small files log_model reads back to check its input example,
    and no warning about the pickle format, chosen on purpose (it returns the nn.Module; `pt2`
    re-traces the model and loads as a GraphModule)."""
    import logging

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def log_model(client: MlflowClient, experiment_id: str, run_id: str, model: Any, input_example: np.ndarray,
              num_classes: int, files: list[str], tags: dict[str, str]) -> str:
    """`model` (an nn.Module in eval mode) as the MLflow model `runs:/<run_id>/model`; returns
    its LoggedModel id. `input_example`: float32 N x C x H x W, as the model sees it."""
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
    # Created here, in the run's experiment: log_model would create it in the fluent experiment.
    logged = client.create_logged_model(experiment_id, MODEL_NAME, source_run_id=run_id, tags=tags,
                                        params=client.get_run(run_id).data.params)
    with _quiet():
        mlflow_pytorch().log_model(
            model, name=MODEL_NAME, run_id=run_id, model_id=logged.model_id, signature=signature,
            input_example=input_example.astype(np.float32), pip_requirements=pip_requirements(),
            code_paths=[str(PACKAGE_DIR)], extra_files=files, serialization_format="pickle")
    return logged.model_id


def register_version(client: MlflowClient, name: str, model_id: str, run_id: str, accuracy: float,
                     tags: dict[str, str]) -> dict[str, Any]:
    """A version of registered model `name` for LoggedModel `model_id`, tagged with its test
    accuracy; the version registered for that model before is returned instead of a second (a
    resumed pipeline, or one that stopped between registering and recording it). The alias
    `best` then points at the version with the highest test accuracy, the oldest of equals."""
    try:
        client.create_registered_model(name, description="final models of selftrain pipelines; alias "
                                       f"`{BEST_ALIAS}`: the version with the highest `{ACCURACY_TAG}` tag")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"models:/{model_id}"
    versions = client.search_model_versions(f"name = '{name}'")
    mine = [v for v in versions if v.source == source]
    if mine:
        version = mine[0]
    else:
        version = client.create_model_version(name, source, run_id=run_id, model_id=model_id,
                                              tags={ACCURACY_TAG: str(accuracy), **tags})
        versions.append(version)
    scored = [v for v in versions if ACCURACY_TAG in v.tags]
    best = max(scored, key=lambda v: (float(v.tags[ACCURACY_TAG]), -int(v.version)))
    if BEST_ALIAS not in (best.aliases or []):
        client.set_registered_model_alias(name, BEST_ALIAS, best.version)
    return {"name": name, "version": int(version.version), "uri": f"models:/{name}/{version.version}",
            "best_version": int(best.version), "best_uri": f"models:/{name}@{BEST_ALIAS}", "model_id": model_id}


def is_model_uri(model: str) -> bool:
    return model.startswith(("runs:/", "models:/"))


def download_model_files(uri: str, root: str, tracking_uri: str) -> str:
    """A local folder holding the `model.pt` + `model.json` of `uri` (`runs:/<id>/<name>`,
    `models:/<name>@<alias>`, `models:/<name>/<version>`): the logged model's `extra_files`, or
    for a run from before models were MLflow models, its `model` artifact folder. Raises
    MlflowException with the registry's or store's reason when there is none."""
    mlflow.set_tracking_uri(tracking_uri)  # models:/ resolves through the registry at this URI
    errors, downloaded = [], False
    for candidate in (f"{uri.rstrip('/')}/{SELFTRAIN_FILES}", uri):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=candidate, dst_path=tempfile.mkdtemp(dir=root))
        except MlflowException as exc:
            errors.append(exc)
            continue
        if (Path(local) / "model.json").is_file():
            return local
        downloaded = True
    if downloaded:
        raise MlflowException(f"{uri} is not a selftrain model (no model.json, neither in {SELFTRAIN_FILES}/ nor at the top)")
    raise errors[0]
