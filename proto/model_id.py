"""The id of a saved model: the name a teacher publishes in ``Info.model_id`` (and a signal cache records).

A model directory written by ``atkd-student`` (``init``, a checkpoint, a run's ``final/``) carries its id in
``config.json`` under :data:`MODEL_ID_KEY`: the run's name, ``<name>-step-<N>`` for a checkpoint. Any other
directory is named by its folder, so a model saved as ``runs/atkd/final`` is not published as ``final``.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_ID_KEY = "atkd_model_id"


def saved_model_id(directory: Path) -> str:
    """The id stored in ``directory/config.json``, or the directory's name when there is none."""
    directory = Path(directory)
    try:
        stored = json.loads((directory / "config.json").read_text()).get(MODEL_ID_KEY)
    except (OSError, ValueError, AttributeError):
        stored = None
    return stored if isinstance(stored, str) and stored else directory.resolve().name
