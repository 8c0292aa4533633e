"""Turn a :class:`~atkd.student.trainer.config.TrainConfig` into the parts of a run: devices, data, teacher."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from atkd.proto.device import resolve_device
from atkd.proto.fingerprint import check_same_tokenizer, tokenizer_fingerprint, weights_digest
from atkd.proto.model_id import saved_model_id
from atkd.student.client import TeacherClient
from atkd.student.client.generate import TeacherGenerator
from atkd.student.data.examples import BatchOrder, Examples, InstructionData, PackedText
from atkd.student.data.generated import generated_examples
from atkd.student.data.sources import SequenceSource, build_source
from atkd.student.models import load_model
from atkd.student.teachers import CachedTeacher, LocalTeacher, RemoteTeacher, SignalCache, TeacherSource

from .config import DataConfig, TeacherSourceConfig, TrainConfig


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by ``torchrun`` (WORLD_SIZE > 1):
    NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def load_examples(data: DataConfig, tokenizer: PreTrainedTokenizerBase, split: str = "train") -> Examples | None:
    """The training (``split="train"``) or held-out (``"eval"``) examples; None when no eval data is set."""
    paths = data.train if split == "train" else data.eval
    if not paths:
        if split == "train":
            raise ValueError("data.train: no training data given")
        return None
    if data.kind == "text":
        return PackedText.from_files(paths, tokenizer, data.seq_len)
    return InstructionData.from_jsonl(paths, tokenizer, data.seq_len, prompt_field=data.prompt_field,
                                      response_field=data.response_field)


def teacher_client(config: TeacherSourceConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                   client_name: str = "") -> TeacherClient:
    """A checked :class:`TeacherClient` of a remote teacher section (raises ``TeacherMismatchError``)."""
    token = os.environ.get(config.token_env) if config.token_env else None
    client = TeacherClient(
        config.addresses, tokenizer=tokenizer, vocab_size=vocab_size, token=token, token_file=config.token_file,
        tls_root_cert=config.tls_root_cert, application=config.application, top_k=config.top_k,
        codec=config.codec, timeout=config.timeout_s, retry_budget=config.retry_budget_s,
        client_id=client_name or None, revision=config.revision,
        allow_revision_change=config.allow_revision_change,
    )  # fmt: skip
    client.check()
    return client


def build_sequence_source(config: TrainConfig, examples: Examples, order: BatchOrder,
                          tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel, *, steps: int, rank: int,
                          client_name: str = "") -> SequenceSource:
    """The run's micro-batches from ``config.data.source`` (:mod:`atkd.student.data.sources`); its
    ``examples`` are the training examples the run uses (offline teacher generations replace the responses)."""
    vocab_size = student.config.vocab_size
    teacher = config.teacher
    used = config.used_teacher
    return build_source(
        config.data.source, examples, order, seed=config.seed, grad_accum=config.grad_accum, steps=steps,
        student_model=student, eos_id=tokenizer.eos_token_id, prefetch=used.prefetch if used else 0,
        teacher_generator=lambda: TeacherGenerator(teacher_client(teacher, tokenizer, vocab_size,
                                                                  f"{client_name}-generate")),
        generated=lambda directory: generated_examples(examples, directory, vocab_size=vocab_size,
                                                       tokenizer_hash=tokenizer_fingerprint(tokenizer)),
        samples_log=Path(config.output_dir) / f"samples-rank{rank}.jsonl",
    )  # fmt: skip


def build_teacher(config: TeacherSourceConfig, tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel,
                  examples: Examples, client_name: str = "") -> TeacherSource:
    """The teacher source of ``config.mode``, checked against the student before it scores anything:
    same vocabulary width and tokenizer fingerprint (remote, local, cache: the one check,
    :func:`~atkd.proto.fingerprint.check_same_tokenizer`), and a cache made for this data and these signal
    options (cache). Raises ``TeacherMismatchError`` / :class:`~atkd.student.teachers.CacheMismatchError`."""
    vocab_size = student.config.vocab_size
    if config.mode == "remote":
        client = teacher_client(config, tokenizer, vocab_size, client_name)
        return RemoteTeacher(client, top_k=config.top_k, codec=config.codec, temperature=config.temperature,
                             tail_samples=config.tail_samples, tail_ids_only=config.ids_only)
    if config.mode == "local":
        model = load_model(config.model, device=str(resolve_device(config.device)))
        check_local_teacher(config.model, model, tokenizer, vocab_size)
        return LocalTeacher(model, top_k=config.top_k or None, temperature=config.temperature,
                            tail_samples=config.tail_samples, tail_ids_only=config.ids_only)
    cache = SignalCache(config.cache_dir)
    pinned = {} if config.revision is None else {"teacher_revision": config.revision}
    cache.check(vocab_size=vocab_size, tokenizer_hash=tokenizer_fingerprint(tokenizer),
                dataset_fingerprint=examples.fingerprint, seq_len=examples.seq_len, top_k=config.top_k,
                tail_samples=config.tail_samples, tail_ids_only=config.ids_only,
                temperature=config.temperature, **pinned)
    return CachedTeacher(cache)


def check_local_teacher(directory: Path, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        vocab_size: int) -> None:
    """The check a server's Info allows (:func:`~atkd.proto.fingerprint.check_same_tokenizer`), for a teacher
    loaded in this process from ``directory``: its tokenizer's fingerprint is compared when one is saved
    there, else only its vocabulary width."""
    try:
        teacher_hash = tokenizer_fingerprint(load_tokenizer(directory))
    except (OSError, ValueError):
        teacher_hash = ""  # no tokenizer saved with the teacher: unknown
    check_same_tokenizer(str(directory), teacher.config.vocab_size, teacher_hash, vocab_size,
                         tokenizer_fingerprint(tokenizer))


def teacher_identity(config: TeacherSourceConfig, teacher: TeacherSource) -> tuple[str, str]:
    """(model id, revision) of a remote or local teacher, for a signal cache's manifest. A remote teacher's
    revision is the one its client pinned, so every signal of the cache comes from it (the client refuses
    another)."""
    if isinstance(teacher, RemoteTeacher):
        info = teacher.client.check()
        return info.model_id, teacher.client.revision or info.model_revision
    return saved_model_id(config.model), weights_digest(config.model)
