"""Everything the demo starts from, built once and cached: corpus -> tokenizer -> token ids ->
pre-trained teacher -> randomly initialised student.

Artefacts live in ``<cache>/demo-<key>/``, where the key hashes every setting and the corpus text, so
changing a setting builds a fresh set and an unchanged one is reused in seconds. Each artefact is
written atomically: an interrupted build leaves only complete artefacts, and the next call resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from atkd.student.data.corpus import DOC_SEP, Corpus, atomic_dir, cache_dir, load_corpus
from atkd.student.data.lm import encode_corpus, random_batches
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.models import build_model, save_model
from atkd.student.optim import OptimConfig
from atkd.student.pretrain import pretrain

log = logging.getLogger(__name__)

ASSETS_VERSION = 3
"""Part of the cache key: bump it when the build recipe changes."""


@dataclass
class DemoAssets:
    """Paths of the saved tokenizer and models, and the encoded corpus (1-D id streams). The model
    directories hold the tokenizer too, so each is a complete Hugging Face model directory (what the
    teacher service loads and fingerprints)."""

    root: Path
    tokenizer_dir: Path
    teacher_dir: Path
    student_init_dir: Path
    train_ids: torch.LongTensor
    heldout_ids: torch.LongTensor
    source: str


def _settings_key(settings: dict, corpus: Corpus) -> str:
    """Short hash of the settings and the exact corpus text."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in (corpus.train, DOC_SEP, corpus.heldout):
        digest.update(text.encode())
    return digest.hexdigest()[:12]


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds ordinary files
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def prepare_demo_assets(
    cache: Path | None = None,
    *,
    family: str = "llama",
    vocab_size: int = 4096,
    teacher_steps: int = 200,
    batch_size: int = 8,
    seq_len: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    source: str = "auto",
) -> DemoAssets:
    """Build (or reuse) the demo's tokenizer, teacher and student starting point.

    The teacher (``SIZES["teacher"]``) is pre-trained for ``teacher_steps`` steps of ``batch_size``
    random windows of ``seq_len`` tokens from the training split; the student (``SIZES["student"]``)
    is only initialised (seed ``seed + 1``) and saved, so every run starts from the same weights.
    With the defaults the first build takes a minute and a half on 2 idle CPU cores (most of it the
    teacher's 200 steps at about 3 steps/s), a reused one a few seconds. ``source`` is passed to :func:`load_corpus`.
    """
    corpus = load_corpus(source)
    settings = dict(
        version=ASSETS_VERSION, family=family, vocab_size=vocab_size, teacher_steps=teacher_steps,
        batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, source=corpus.source,
    )  # fmt: skip
    root = (cache or cache_dir()) / f"demo-{_settings_key(settings, corpus)}"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, teacher_dir, student_dir = root / "tokenizer", root / "teacher", root / "student_init"
    ids_path = root / "ids.pt"

    if not tokenizer_dir.is_dir():
        log.info("training a %d-token BPE on the %s corpus", vocab_size, corpus.source)
        with atomic_dir(tokenizer_dir) as tmp:
            train_tokenizer(corpus.train.split(DOC_SEP), vocab_size, tmp)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    if not ids_path.is_file():
        log.info("encoding the corpus")
        ids = {"train": encode_corpus(corpus.train, tokenizer), "heldout": encode_corpus(corpus.heldout, tokenizer)}
        _save_tensors_atomic(ids, ids_path)
    ids = torch.load(ids_path, weights_only=True)

    if not teacher_dir.is_dir():
        log.info("pre-training the %s teacher for %d steps", family, teacher_steps)
        teacher = build_model(family, len(tokenizer), "teacher", seed)
        pretrain(teacher, random_batches(ids["train"], batch_size, seq_len, seed), teacher_steps, OptimConfig(lr=lr))
        with atomic_dir(teacher_dir) as tmp:
            save_model(teacher, tmp)
            tokenizer.save_pretrained(tmp)

    if not student_dir.is_dir():
        with atomic_dir(student_dir) as tmp:
            save_model(build_model(family, len(tokenizer), "student", seed + 1), tmp)
            tokenizer.save_pretrained(tmp)

    return DemoAssets(
        root=root,
        tokenizer_dir=tokenizer_dir,
        teacher_dir=teacher_dir,
        student_init_dir=student_dir,
        train_ids=ids["train"],
        heldout_ids=ids["heldout"],
        source=corpus.source,
    )
