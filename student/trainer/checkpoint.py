"""Checkpoints that resume exactly.

A checkpoint is a directory ``<output_dir>/checkpoints/step-00000100/`` holding

- the student as a complete Hugging Face model directory: ``config.json`` (with the model id
  ``<run>-step-<N>``, :mod:`atkd.proto.model_id`), safetensors weights and the tokenizer's files, so
  ``atkd-teacher serve --model``, ``atkd-student eval --model`` or a config's ``student:`` take it as it is;
- ``trainer_state.pt``: optimizer and LR-schedule state, the RNG states (torch CPU and CUDA, Python),
  the step, the data position (micro-batches consumed, see :class:`atkd.student.data.examples.BatchOrder`),
  the tokens seen and the schedule's length.

On CPU an interrupted run resumed from its last checkpoint ends with the same weights as an
uninterrupted one: the data order and the tail-sample seeds are functions of the data position, and
everything stateful is in the checkpoint. Writes are atomic (a temporary directory renamed into place),
so a run killed while saving leaves the previous checkpoint intact; only the newest ``keep`` are kept.

A sharded student (``parallel: fsdp``) saves ``shards/`` instead of the weights: every rank's shards of model and
optimizer state (``torch.distributed.checkpoint``, :mod:`atkd.student.trainer.fsdp`), next to the student's
``config.json``, the tokenizer and ``trainer_state.pt`` (without the optimizer); saving and loading it are
collectives of all ranks. Its ``final/`` is gathered into a complete model directory as usual.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from atkd.student.models import save_model

from .fsdp import load_sharded, save_sharded

STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"
PREFIX = "step-"


@dataclass
class TrainState:
    """Where a run is: optimizer ``step``s done, ``micro_batch``es consumed (per rank), ``tokens`` trained on
    (all ranks), and ``schedule_steps``, the length of the LR schedule it ran under (0: not recorded, a
    checkpoint from before the field existed)."""

    step: int = 0
    micro_batch: int = 0
    tokens: int = 0
    schedule_steps: int = 0


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler, state: TrainState, keep: int = 2, *,
                    tokenizer: PreTrainedTokenizerBase | None = None, run_name: str | None = None,
                    sharded: bool = False) -> Path:
    """Write the checkpoint of ``state.step`` and delete all but the newest ``keep``; returns its path.

    With ``tokenizer`` its files are saved too; with ``run_name`` the model id ``<run_name>-step-<N>``.
    ``sharded``: the model is sharded with FSDP2; every rank calls this and writes its shards."""
    if sharded:
        return _save_sharded(output_dir, model, optimizer, schedule, state, keep, tokenizer)
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    save_model(model, tmp, tokenizer=tokenizer, model_id=None if run_name is None else f"{run_name}-step-{state.step}")
    torch.save(_trainer_state(state, schedule, optimizer), tmp / STATE_FILE)
    _publish(tmp, final, output_dir, keep)
    return final


def _trainer_state(state: TrainState, schedule, optimizer: torch.optim.Optimizer | None) -> dict:
    saved = {
        "state": asdict(state),
        "schedule": schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }  # fmt: skip
    if optimizer is not None:
        saved["optimizer"] = optimizer.state_dict()
    return saved


def _publish(tmp: Path, final: Path, output_dir: Path, keep: int) -> None:
    """Rename the written ``tmp`` into place and delete all but the newest ``keep`` checkpoints."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def _save_sharded(output_dir: Path, model, optimizer, schedule, state: TrainState, keep: int,
                  tokenizer: PreTrainedTokenizerBase | None) -> Path:
    is_main = dist.get_rank() == 0
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".{final.name}.tmp"  # one name every rank knows
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_sharded(tmp / SHARDS_DIR, model, optimizer)
    if is_main:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(_trainer_state(state, schedule, None), tmp / STATE_FILE)
        _publish(tmp, final, output_dir, keep)
    dist.barrier()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file())


def load_checkpoint(path: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler) -> TrainState:
    """Restore model weights, optimizer, schedule and RNG states from ``path``; returns its state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint ({STATE_FILE} missing)")
    saved = torch.load(path / STATE_FILE, weights_only=True)
    if (path / SHARDS_DIR).is_dir():
        load_sharded(path / SHARDS_DIR, model, optimizer)
    else:
        _load_weights(path, model)
        optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(_as_tuples(saved["rng"]["python"]))
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return TrainState(**saved["state"])


def _load_weights(path: Path, model: PreTrainedModel) -> None:
    weights = sorted(path.glob("*.safetensors"))
    if len(weights) != 1:
        raise ValueError(f"{path}: expected one model.safetensors, found {[w.name for w in weights]}")
    missing, unexpected = load_model(model, weights[0], strict=False)
    params = model.state_dict()
    loaded = {params[name].data_ptr() for name in params if name not in missing}
    untied = [name for name in missing if params[name].data_ptr() not in loaded]  # tied weights are stored once
    if untied or unexpected:
        raise ValueError(f"{path} does not fit the student: missing {untied}, unexpected {unexpected}")


def _as_tuples(value):
    """random.setstate wants the nested tuples that torch.save may hand back as lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
