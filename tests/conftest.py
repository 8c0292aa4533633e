"""Shared fixtures: a tokenizer trained on the local excerpt, tiny models saved with it (no downloads), and
teacher replicas serving them on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from atkd.services.teacher.config import TeacherConfig
from atkd.services.teacher.engine import TeacherEngine
from atkd.student.data.corpus import EXCERPT_PATH
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.models import tiny_config
from tests.teacher_harness import ServerThread

EXCERPT = EXCERPT_PATH  # the shipped excerpt (package data)
TINY_VOCAB = 512
TINY_DIMS = dict(hidden=32, layers=2, heads=2, max_len=128)


@pytest.fixture(scope="session")
def excerpt_paragraphs() -> list[str]:
    """The paragraphs of the local Shakespeare excerpt."""
    return EXCERPT.read_text().split("\n\n")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, excerpt_paragraphs) -> dict[str, Path]:
    """train.txt (90% of the excerpt's paragraphs) and eval.txt (the rest)."""
    root = tmp_path_factory.mktemp("corpus")
    cut = int(0.9 * len(excerpt_paragraphs))
    (root / "train.txt").write_text("\n\n".join(excerpt_paragraphs[:cut]))
    (root / "eval.txt").write_text("\n\n".join(excerpt_paragraphs[cut:]))
    return {"train": root / "train.txt", "eval": root / "eval.txt"}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, excerpt_paragraphs) -> PreTrainedTokenizerFast:
    """Byte-level BPE of :data:`TINY_VOCAB` ids trained on the Shakespeare excerpt."""
    return train_tokenizer(excerpt_paragraphs, TINY_VOCAB, tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer) -> Callable[[str], Path]:
    """``make(family) -> directory`` of a tiny random model (``TINY_DIMS``, V = :data:`TINY_VOCAB`) saved
    with the tokenizer beside it; built once per family and session. Weights are drawn with a larger
    initializer range (0.3) than the default so that the distributions are peaked like a trained model's."""
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            config = tiny_config(family, TINY_VOCAB, **TINY_DIMS)
            config.initializer_range = 0.3
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config)
            directory = tmp_path_factory.mktemp(f"tiny_{family}")
            model.save_pretrained(directory)
            tiny_tokenizer.save_pretrained(directory)
            built[family] = directory
        return built[family]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    """A tiny Llama with its tokenizer (see :func:`tiny_model_factory`)."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_teacher_engine(tiny_model_dir) -> TeacherEngine:
    """The teacher engine of :func:`tiny_model_dir`, loaded once."""
    return TeacherEngine.load(tiny_model_dir)


@pytest.fixture
def serve_teacher(tiny_model_dir, tiny_teacher_engine):
    """``serve_teacher(engine=None, **config) -> ServerThread``: a started replica of the tiny Llama on
    127.0.0.1 (free ports; ``engine`` replaces the shared engine, e.g. a gated one); closed after the test."""
    servers = []

    def serve(engine=None, **overrides) -> ServerThread:
        options = dict(port=0, http_port=0, top_k_max=64, max_tail_samples=8, max_batch_tokens=1024)
        config = TeacherConfig(model=tiny_model_dir, **{**options, **overrides})
        server = ServerThread(config, lambda: engine or tiny_teacher_engine)
        servers.append(server)
        return server.start()

    yield serve
    for server in servers:
        server.close()
