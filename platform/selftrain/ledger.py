"""`<output_dir>/state.json`: which stages finished, with their results, for resuming.

Re-running a pipeline with the same `output_dir` skips every recorded stage; a stage that did
not record its result is redone from scratch (its partial outputs are cleared by the caller).
A different config in the same directory is refused, naming what differs. Nothing is written
until the first record: a run that fails validating its input leaves no ledger behind, so the
corrected command is not refused as "a different config".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selftrain.config import PipelineConfig, diff_configs
from selftrain.errors import ConfigError
from selftrain.fsio import atomic_write_json
from selftrain.masking import redact_tree

T = TypeVar("T")


class Ledger:
    def __init__(self, output_dir: Path, config: PipelineConfig | dict[str, Any], kind: str = "run"):
        self.path = output_dir / "state.json"
        resolved = config.model_dump() if isinstance(config, PipelineConfig) else dict(config)
        resolved.pop("output_dir", None)  # the same directory may be spelled differently
        resolved = redact_tree(resolved)  # stored and compared masked: no data credentials on disk
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
            # Keys added to selftrain since the run started read as their defaults in its stored config.
            defaults = _defaults() if isinstance(config, PipelineConfig) else None
            changes = diff_configs(self.state["config"], resolved, defaults=defaults)
            if changes:
                raise ConfigError(
                    f"{output_dir} holds a {kind} with a different config; use a new output_dir or "
                    "the same config to resume. Differences (stored -> now):\n  " + "\n  ".join(changes)
                )
        else:
            self.state = {"config": resolved, "records": {}}

    def get(self, key: str) -> Any:
        return self.state["records"].get(key)

    def put(self, key: str, value: Any) -> None:
        self.state["records"][key] = value
        self._save()

    def stage(self, key: str, compute: Callable[[], T]) -> T:
        """The recorded result of `key`, or `compute()` recorded now."""
        if key not in self.state["records"]:
            self.put(key, compute())
        return self.state["records"][key]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.state, indent=2, default=str)  # never half a ledger


def _defaults() -> dict[str, Any]:
    """The stored form (masked, without output_dir) of a config of defaults only."""
    dump = PipelineConfig().model_dump()
    dump.pop("output_dir", None)
    return redact_tree(dump)
