"""The training job's configuration: one typed object, loaded from YAML, every field overridable.

    atkd-student train --config run.yaml --teacher.mode local --optim.lr 1e-3 --max_steps 200

A flag is a dotted path into the config (``-`` and ``_`` are the same); its value is read as YAML, so
``10`` is an int, ``true`` a bool and ``[a, b]`` a list. Unknown keys and bad values are errors that
name the field, e.g. ``teacher.top_k: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atkd.student.losses import LOSSES, NO_TEACHER, tail_read_by_forward_kl
from atkd.student.optim import OptimConfig


class Section(BaseModel):
    """A config section: unknown keys are errors. (``optim`` is :class:`atkd.student.optim.OptimConfig`.)"""

    model_config = ConfigDict(extra="forbid")


class SourceConfig(Section):
    """``data.source``: where each micro-batch's responses come from (:mod:`atkd.student.data.sources`)."""

    name: Literal["dataset", "teacher", "student", "mix"] = Field(
        "dataset", description="dataset responses; teacher generations (SeqKD); student samples (on-policy); mix")
    generations: Path | None = Field(None, description="teacher / mix_with teacher: directory written by `atkd-student "
                                                       "generate` (offline); unset: generated online")
    lmbda: float = Field(0.5, ge=0, le=1, description="mix: probability that an example is the student's sample "
                                                      "(GKD's lmbda; with lmbda_start: the final value)")
    lmbda_start: float | None = Field(None, ge=0, le=1, description="mix: ImitKD's annealing, linear from this "
                                                                    "value at step 0 to lmbda at anneal_steps")
    anneal_steps: int = Field(0, ge=0, description="mix: steps of the annealing (0: the whole run)")
    mix_with: Literal["dataset", "teacher"] = Field("dataset", description="mix: the response of the examples that "
                                                                           "are not the student's")
    max_new_tokens: int | None = Field(None, ge=1, description="new tokens per sampled response (default: up to "
                                                               "seq_len)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (student and teacher samples)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1: off)")
    top_k: int = Field(0, ge=0, description="top-k sampling cut (0: off)")
    staleness: int = Field(0, ge=0, description="student / mix: micro-batches sampled ahead with older weights, so "
                                                "that the teacher scores them while the student trains (0: exact)")
    log_samples: bool = Field(False, description="write every sampled response to output_dir/samples-rank<r>.jsonl")


class DataConfig(Section):
    kind: Literal["text", "instruction"] = Field("text", description="packed plain text, or prompt/response JSONL")
    train: list[Path] = Field([], description="text: .txt files or directories of them; instruction: .jsonl files")
    eval: list[Path] = Field([], description="held-out data of the same kind (optional)")
    seq_len: int = Field(128, ge=2, description="tokens per example (packed windows; instruction: padded length)")
    prompt_field: str = Field("prompt", description="instruction data: key of the prompt")
    response_field: str = Field("response", description="instruction data: key of the response")
    eval_batches: int | None = Field(50, ge=1, description="batches of held-out data per evaluation (None: all)")
    source: SourceConfig = SourceConfig()

    @model_validator(mode="after")
    def _source_needs_prompts(self) -> DataConfig:
        if self.source.name != "dataset" and self.kind != "instruction":
            raise ValueError(f"data.source.name={self.source.name!r} needs data.kind: instruction (prompts to "
                             "sample responses to)")
        return self

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, Path)) else value


class TeacherSourceConfig(Section):
    mode: Literal["remote", "local", "cache"] = Field("remote", description="where teacher signals come from")
    addresses: list[str] = Field([], description="remote: host:port of each replica, or one dns:///name:port")
    application: str | None = Field(None, description="remote on Ray Serve: the Serve application name")
    token_file: Path | None = Field(None, description="remote: file holding the bearer token")
    token_env: str | None = Field(None, description="remote: environment variable holding the bearer token")
    tls_root_cert: Path | None = Field(None, description="remote: PEM of the CA to trust (TLS)")
    timeout_s: float = Field(60.0, gt=0, description="remote: deadline of one attempt of a Score call (a replica that "
                                                     "takes longer is failed over, as a dead one is)")
    retry_budget_s: float = Field(120.0, ge=0, description="remote: seconds to keep failing over / retrying a failed "
                                                           "batch before the run stops with a checkpoint")
    revision: str | None = Field(None, description="remote / cache: the teacher model revision this run requires "
                                                   "(default: the first replica's, then pinned)")
    allow_revision_change: bool = Field(False, description="remote: accept replicas that answer with another "
                                                           "revision mid-run (default: stop with an error)")
    model: Path | None = Field(None, description="local: directory of the teacher model")
    device: str = Field("auto", description="local: torch device of the teacher")
    cache_dir: Path | None = Field(None, description="cache: directory written by `atkd-student export-cache`")
    top_k: int = Field(64, ge=0, description="top-k log-probs per position (local only: 0 for dense logits)")
    tail_samples: int = Field(64, ge=0, description="tokens sampled from the teacher's tail per position")
    tail_ids_only: bool | None = Field(None, description="send the tail samples' ids without their log-probs, and one "
                                                         "exact tail mean per position: half the bytes a sample "
                                                         "(default: on where the loss reads the tail by forward KL: "
                                                         "atkd with the forward base, forward_kl, dkd)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the teacher signal")
    codec: Literal["fp16", "q8"] = Field("q8", description="remote: wire encoding of the signal")
    prefetch: int = Field(2, ge=0, description="batches scored ahead while the student trains")

    @field_validator("addresses", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _mode_needs(self) -> TeacherSourceConfig:
        needs = {"remote": "addresses", "local": "model", "cache": "cache_dir"}[self.mode]
        if not getattr(self, needs):
            raise ValueError(f"teacher.mode={self.mode!r} needs teacher.{needs}")
        if self.top_k == 0 and (self.mode != "local" or self.tail_samples):
            raise ValueError("teacher.top_k=0 (dense logits) needs teacher.mode='local' and tail_samples=0")
        if self.tail_ids_only and not self.tail_samples:
            raise ValueError("teacher.tail_ids_only needs teacher.tail_samples > 0")
        return self

    @property
    def ids_only(self) -> bool:
        """Whether the tail samples go as ids only: ``tail_ids_only`` as :class:`TrainConfig` resolved it from the
        loss (None, not resolved, is off)."""
        return bool(self.tail_ids_only)


class LossConfig(Section):
    name: str = Field("atkd", description=f"one of {sorted(LOSSES)}")
    options: dict[str, Any] = Field({}, description="keyword options of the loss, e.g. {lam: 0.2, split: median}")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in LOSSES:
            raise ValueError(f"unknown loss {value!r}; choose one of {sorted(LOSSES)}")
        return value


class TrainConfig(Section):
    """Everything ``atkd-student train`` needs; defaults suit a laptop CPU."""

    student: Path = Field(description="directory of the student model (HF causal LM) to start from")
    tokenizer: Path | None = Field(None, description="tokenizer directory (default: the student's)")
    output_dir: Path = Field(Path("runs/atkd"), description="checkpoints, metrics.jsonl and the final model")
    run_name: str | None = Field(None, description="model id of the saved models: final/ is <run_name>, a "
                                                   "checkpoint <run_name>-step-N (default: output_dir's name)")
    data: DataConfig
    teacher: TeacherSourceConfig | None = Field(None, description="the teacher (every loss but sft needs one; sft "
                                                                  "ignores it; --teacher null unsets it)")
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    batch_size: int = Field(8, ge=1, description="examples per micro-batch (per rank)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (default: from epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (if max_steps is unset)")
    max_time: float | None = Field(None, gt=0, description="wall-time bound of this invocation: seconds or e.g. "
                                                           "1h30m; stops before it with a checkpoint, as SIGTERM does")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast of the student forward "
                                                                     "(fsdp: bf16 parameters, fp32 reduction)")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: replicate the student (ddp) or "
                                                                "shard it with FSDP2 (fsdp)")
    fused_head: bool = Field(True, description="compute the loss from the last hidden states and the head weight "
                                               "chunk by chunk, never all [tokens, vocab] logits (where the "
                                               "model allows it)")
    seed: int = Field(0, description="seed of initialisation-independent randomness: data order, tail samples")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    save_every: int = Field(100, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk (the newest)")
    log_every: int = Field(1, ge=1, description="write metrics every N steps")
    device: str = Field("auto", description="student device: cpu, cuda, cuda:1 (auto: cuda if available)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per rank (default: the cores less "
                                                        "one for a teacher server here, shared by the ranks here)")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @property
    def name(self) -> str:
        """The run's name: ``run_name``, or the name of ``output_dir``."""
        return self.run_name or Path(self.output_dir).resolve().name

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs")
        if self.teacher is None and self.loss.name not in NO_TEACHER:
            raise ValueError(f"loss {self.loss.name!r} needs a teacher section")
        source = self.data.source
        online = source.generations is None and (
            source.name == "teacher" or (source.name == "mix" and source.mix_with == "teacher"))
        if online and (self.teacher is None or self.teacher.mode != "remote"):
            raise ValueError("data.source: online teacher generations need teacher.mode remote (the Generate RPC), "
                             "or data.source.generations from `atkd-student generate`")
        if source.name != "dataset" and self.used_teacher is not None and self.teacher.mode == "cache":
            raise ValueError(f"data.source.name={source.name!r} trains on other sequences than the dataset's: a "
                             "signal cache (teacher.mode cache) cannot score them")
        teacher = self.teacher
        if teacher is not None and teacher.tail_ids_only is None:
            teacher.tail_ids_only = teacher.tail_samples > 0 and tail_read_by_forward_kl(self.loss.name,
                                                                                         self.loss.options)
        return self

    @property
    def used_teacher(self) -> TeacherSourceConfig | None:
        """The teacher section the loss reads: None for a loss without a teacher (sft), whatever is set."""
        return None if self.loss.name in NO_TEACHER else self.teacher


_DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d*)?)h)?(?:(?P<m>\d+(?:\.\d*)?)m)?(?:(?P<s>\d+(?:\.\d*)?)s?)?")


def parse_duration(text: str) -> float:
    """Seconds in ``"1h30m"``, ``"90m"``, ``"45s"``, ``"1.5h"`` or ``"3600"``; ``ValueError`` otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(match.groupdict().values()):
        raise ValueError(f"not a duration: {text!r} (expected seconds or e.g. 1h30m, 90m, 45s)")
    hours, minutes, seconds = (float(match[unit] or 0) for unit in "hms")
    return 3600 * hours + 60 * minutes + seconds


def load_config(path: Path | None, overrides: Sequence[str] = (), model: type[BaseModel] = TrainConfig):
    """``model`` from the YAML file at ``path`` (if any) with ``--dotted.key value`` ``overrides`` on top.

    Raises ``ValueError`` with one line per problem, each naming its field.
    """
    values: dict = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    for key, value in parse_overrides(overrides):
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"--{key}: {parent} is not a section")
        target[leaf] = value
    try:
        return model(**values)
    except ValidationError as error:
        raise ValueError("\n".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
                                   for e in error.errors())) from None


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """``["--a.b-c", "1", "--d=x"]`` -> ``[("a.b_c", 1), ("d", "x")]`` (values parsed as YAML)."""
    pairs, args = [], list(args)
    while args:
        flag = args.pop(0)
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if not args:
                raise ValueError(f"{flag} needs a value")
            value = args.pop(0)
        pairs.append((key.replace("-", "_"), yaml.safe_load(value) if value else None))
    return pairs


def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """One ``--dotted.name  description (default: ...)`` line per field, sections expanded (for ``--help``)."""
    lines = []
    for name, field in model.model_fields.items():
        kinds = [field.annotation, *getattr(field.annotation, "__args__", ())]
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is not None:
            lines.extend(describe_fields(section, f"{prefix}{name}."))
            continue
        default = "" if field.default is None else f" (default: {field.default})"
        default = " (required)" if field.is_required() else default
        lines.append(f"  --{prefix}{name:<{max(1, 22 - len(prefix))}} {field.description or ''}{default}")
    return lines
