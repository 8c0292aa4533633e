"""Teacher signals exported once to disk and read back by any number of students.

Layout of a cache directory::

    manifest.json            what the signals are (see :class:`CacheManifest`)
    shard-00000.safetensors  examples [0, shard_size): one tensor per TeacherSignal field, [n, T, ...]
    shard-00001.safetensors  ...

Signals are stored per dataset *example* (:mod:`atkd.student.data.examples`), not per batch, so a sweep over
batch sizes, seeds or learning rates reuses one teacher pass. Values are stored as the wire carries
them, so a cache of a server's signals reads back bit for bit: the per-position scalars in float32, the
top-k and tail-sample log-probs in float16 for the fp16 codec (float32 otherwise), ids in int32. Tail samples are
drawn once per example at export, so every epoch sees the same draw (a live teacher redraws).

Before training, :meth:`SignalCache.check` compares the manifest with the student's tokenizer (the one
compatibility check of :func:`atkd.proto.fingerprint.check_same_tokenizer`), the dataset and the signal
options, and names the first field that differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from atkd.proto.fingerprint import check_same_tokenizer
from atkd.proto.signal import TeacherSignal
from atkd.student.data.examples import Examples
from atkd.student.data.lm import LMBatch

from .prefetch import prefetched
from .source import Deferred, TeacherSource

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_FIELDS = [field.name for field in dataclasses.fields(TeacherSignal)]


class CacheMismatchError(ValueError):
    """The cache on disk was not made for this student, dataset or signal configuration."""


@dataclass(frozen=True)
class CacheManifest:
    """What a cache holds. ``teacher_*`` identify the teacher (Info of a server, or the local model);
    ``dataset_fingerprint`` is :attr:`Examples.fingerprint`; the rest are the signal options."""

    teacher_model_id: str
    teacher_revision: str
    tokenizer_hash: str
    vocab_size: int
    dataset_fingerprint: str
    dataset_kind: str
    num_examples: int
    seq_len: int
    top_k: int
    tail_samples: int
    temperature: float
    codec: str
    shard_size: int
    format_version: int = FORMAT_VERSION
    tail_ids_only: bool = False  # absent from the manifests of earlier versions, which sent the log-probs

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard:05d}.safetensors"

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)


def export_signals(
    teacher: TeacherSource,
    examples: Examples,
    out_dir: Path,
    manifest: CacheManifest,
    *,
    batch_size: int = 8,
    prefetch: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> CacheManifest:
    """Score every example of ``examples`` in order with ``teacher`` and write the cache to ``out_dir``.

    ``manifest`` describes the teacher and options (its dataset fields must match ``examples``).
    Batches of ``batch_size`` examples go out ``prefetch`` ahead; batch j's tail samples use seed
    ``seed + j``. The manifest is written last, so an interrupted export is never mistaken for a cache.
    """
    if manifest.dataset_fingerprint != examples.fingerprint or manifest.num_examples != len(examples):
        raise ValueError("the manifest does not describe these examples")
    if manifest.shard_size % batch_size:
        raise ValueError(f"shard_size ({manifest.shard_size}) must be a multiple of batch_size ({batch_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    list_dtype = torch.float16 if manifest.codec == "fp16" else torch.float32

    def storable(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t.to(torch.int32)
        return t.to(list_dtype if t.dim() == 3 else torch.float32)  # [n, T, k] lists vs [n, T] scalars

    batches = ((examples.batch(range(start, min(start + batch_size, len(examples)))), seed + number)
               for number, start in enumerate(range(0, len(examples), batch_size)))
    shard, parts, filled = 0, [], 0
    with tqdm(total=len(examples), desc="export", unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for _, signal, _ in prefetched(teacher, batches, prefetch):
            if not isinstance(signal, TeacherSignal):
                raise TypeError("export needs a compressed signal: give the teacher a top_k")
            parts.append(signal.map_tensors(storable))
            filled += signal.target_logprob.shape[0]
            bar.update(signal.target_logprob.shape[0])
            if filled == manifest.shard_size:
                _write_shard(parts, out_dir / manifest.shard_name(shard))
                shard, parts, filled = shard + 1, [], 0
    if parts:
        _write_shard(parts, out_dir / manifest.shard_name(shard))
    (out_dir / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
    return manifest


def _write_shard(parts: list[TeacherSignal], path: Path) -> None:
    tensors = {}
    for name in _FIELDS:
        values = [getattr(part, name) for part in parts]
        if values[0] is not None:
            tensors[name] = torch.cat(values).contiguous()
    partial = path.with_suffix(".partial")
    save_file(tensors, partial)
    partial.replace(path)


class SignalCache:
    """A cache directory opened for reading; :meth:`signals` gathers any examples as one batch."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no signal cache at {self.directory} ({MANIFEST} missing: "
                                    "run `atkd-student export-cache` first, or it was interrupted)")
        self.manifest = CacheManifest(**json.loads(manifest_path.read_text()))
        if self.manifest.format_version != FORMAT_VERSION:
            raise CacheMismatchError(f"{manifest_path}: format version {self.manifest.format_version}, this "
                                     f"version reads {FORMAT_VERSION}: export the cache again")
        self._shards = [safe_open(str(self.directory / self.manifest.shard_name(s)), "pt")
                        for s in range(self.manifest.num_shards)]

    def check(self, *, vocab_size: int, tokenizer_hash: str, **expected) -> None:
        """Refuse a cache that was not made for this run.

        Its teacher must share the student's tokenizer (``vocab_size``, ``tokenizer_hash``: the student's;
        :func:`~atkd.proto.fingerprint.check_same_tokenizer` raises ``TeacherMismatchError``), and every
        manifest field in ``expected`` (e.g. ``dataset_fingerprint=..., top_k=64``) must match:
        :class:`CacheMismatchError` names the first that differs.
        """
        manifest = self.manifest
        check_same_tokenizer(f"{manifest.teacher_model_id} (signal cache {self.directory})", manifest.vocab_size,
                             manifest.tokenizer_hash, vocab_size, tokenizer_hash)
        for name, value in expected.items():
            actual = getattr(manifest, name)
            if actual != value:
                raise CacheMismatchError(f"signal cache {self.directory} was exported with {name}={actual!r}, "
                                         f"this run needs {value!r}: export the cache again for this run")

    def signals(self, example_ids: torch.Tensor) -> TeacherSignal:
        """The stored signals of ``example_ids [B]`` as one :class:`TeacherSignal` ``[B, T]`` (float32, int64)."""
        size = self.manifest.shard_size
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in _FIELDS}
        for example in example_ids.tolist():
            if not 0 <= example < self.manifest.num_examples:
                raise IndexError(f"example {example} is not in the cache ({self.manifest.num_examples} examples)")
            shard, row = divmod(example, size)
            for name in _FIELDS:
                if name in self._shards[shard].keys():
                    rows[name].append(self._shards[shard].get_slice(name)[row : row + 1])
        fields = {}
        for name, values in rows.items():
            if values:
                stacked = torch.cat(values)
                fields[name] = stacked.long() if not stacked.is_floating_point() else stacked.float()
            else:
                fields[name] = None
        return TeacherSignal(**fields)


class CachedTeacher(TeacherSource):
    """Signals read from a :class:`SignalCache` for the examples of each batch (the seed is ignored:
    the tail samples were drawn at export)."""

    def __init__(self, cache: SignalCache):
        self.cache = cache

    def submit(self, batch: LMBatch, seed: int | None = None) -> Deferred:
        if batch.example_ids is None:
            raise ValueError("a cached teacher needs batches drawn from a dataset (LMBatch.example_ids)")
        return Deferred(lambda: self.cache.signals(batch.example_ids))
