"""``atkd-student init``: a tokenizer and a model saved together, the starting point of ``train`` and ``serve``.

    atkd-student init --text corpus.txt more/ --vocab-size 4096 --family llama --size teacher --out runs/teacher_init
    atkd-student init --tokenizer runs/teacher_init --family llama --size student --out runs/student_init
    atkd-student init --from my_model/ --out runs/teacher_init    # a local HF model, saved with its tokenizer

The tokenizer is either a byte-level BPE trained on ``--text`` (files, or directories of ``*.txt``;
:func:`~atkd.student.data.tokenizer.train_tokenizer`) or the one saved in ``--tokenizer DIR``, so that a
teacher and its students share one. The model is either fresh, of a family (:data:`~atkd.student.models.FAMILIES`)
and a size (a name of :data:`~atkd.student.models.SIZES` or ``HIDDENxLAYERSxHEADS``), initialised from
``--seed`` with the tokenizer's eos and pad ids, or the model of a local Hugging Face directory (``--from``),
whose vocabulary must hold every id of the tokenizer. A fresh model scores ``len(tokenizer)`` ids, or as many
as the model saved in ``--tokenizer DIR`` when there is one, so a student built from a teacher's directory
scores the teacher's ids.

The output directory is a complete Hugging Face model directory (config with the model id, the directory's
name; safetensors; tokenizer files), written atomically: ``atkd-teacher serve --model DIR`` serves it and a
training config's ``student: DIR`` starts from it. The same inputs and seed give the same directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from atkd.proto.fingerprint import tokenizer_fingerprint
from atkd.student.data.corpus import atomic_dir
from atkd.student.data.examples import text_files
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.models import FAMILIES, SIZES, build_model, load_model, save_model
from atkd.student.trainer.parts import load_tokenizer

log = logging.getLogger(__name__)

MIN_VOCAB = 258
"""The 256 byte symbols and the two special tokens of :func:`train_tokenizer`."""


def parse_size(size: str) -> dict[str, int]:
    """``"teacher"`` / ``"student"`` (:data:`SIZES`) or ``"HIDDENxLAYERSxHEADS"`` -> ``{hidden, layers, heads}``."""
    if size in SIZES:
        return dict(SIZES[size])
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", size.strip().lower())
    if match is None:
        raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)} or HIDDENxLAYERSxHEADS, e.g. 256x4x4")
    hidden, layers, heads = map(int, match.groups())
    if min(hidden, layers, heads) < 1 or hidden % heads:
        raise ValueError(f"--size {size!r}: the hidden width must be a positive multiple of the heads")
    return dict(hidden=hidden, layers=layers, heads=heads)


def text_pieces(paths: Sequence[Path], chars: int = 1 << 20) -> Iterator[str]:
    """The text of ``paths`` (files, or directories of ``*.txt``) in pieces of about ``chars`` characters
    cut at line ends, so a large corpus is never one string."""
    for file in text_files(paths):
        piece: list[str] = []
        size = 0
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                piece.append(line)
                size += len(line)
                if size >= chars:
                    yield "".join(piece)
                    piece, size = [], 0
        if piece:
            yield "".join(piece)


def init_model_dir(out: Path, *, text: Sequence[Path] = (), vocab_size: int = 4096, tokenizer_dir: Path | None = None,
                   family: str | None = None, size: str | None = None, from_dir: Path | None = None,
                   max_len: int = 512, seed: int = 0) -> dict:
    """Write the tokenizer and model described in the module docstring to ``out`` (which must not exist).

    Tokenizer: ``text`` (train one of ``vocab_size``) or ``tokenizer_dir``; with ``from_dir`` and neither, the
    one saved there. Model: ``family`` + ``size`` (+ ``max_len`` positions, ``seed``), or ``from_dir``.
    Returns a summary: ``out``, ``model_id``, ``model_type``, ``parameters``, ``vocab_size`` (the ids the
    model scores), ``tokens`` (the tokenizer's) and ``tokenizer_fingerprint``. Raises ``ValueError`` or
    ``FileNotFoundError`` naming the option at fault, before anything is written.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists: choose another directory or delete it")
    if (from_dir is None) == (family is None):
        raise ValueError("give --family (and --size) for a new model, or --from DIR for an existing one")
    if text and tokenizer_dir is not None:
        raise ValueError("give --text (train a tokenizer) or --tokenizer DIR (reuse one), not both")
    if not text and tokenizer_dir is None and from_dir is None:
        raise ValueError("give --text to train a tokenizer or --tokenizer DIR to reuse one")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"--family {family!r}: expected one of {FAMILIES}")
    dims = parse_size(size or "") if family is not None else None
    if text and vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size {vocab_size}: at least {MIN_VOCAB} (256 bytes and 2 special tokens)")
    files = text_files(text) if text else []  # raises FileNotFoundError before the long part

    with atomic_dir(out) as tmp:
        if files:
            log.info("training a %d-token byte-level BPE on %d file(s)", vocab_size, len(files))
            tokenizer = train_tokenizer(text_pieces(files), vocab_size, tmp)
        else:
            tokenizer = load_tokenizer(tokenizer_dir or from_dir)
        if from_dir is not None:
            model = _existing_model(from_dir, tokenizer, own_tokenizer=not files and tokenizer_dir is None)
        else:
            model = _fresh_model(family, dims, tokenizer, _width(tokenizer, tokenizer_dir), max_len, seed)
        save_model(model, tmp, tokenizer=tokenizer, model_id=out.name)
    return {
        "out": str(out), "model_id": out.name, "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": model.config.vocab_size,
        "tokens": len(tokenizer), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }  # fmt: skip


def _width(tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path | None) -> int:
    """The ids a fresh model scores: those of the model saved in ``tokenizer_dir`` if any, else the tokenizer's."""
    config = Path(tokenizer_dir or "") / "config.json"
    width = json.loads(config.read_text()).get("vocab_size") if tokenizer_dir is not None and config.is_file() else None
    return width if isinstance(width, int) and width >= len(tokenizer) else len(tokenizer)


def _fresh_model(family: str, dims: dict, tokenizer: PreTrainedTokenizerBase, width: int, max_len: int,
                 seed: int) -> PreTrainedModel:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: a model needs one to end and separate documents")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_model(family, width, {**dims, "max_len": max_len, "eos_id": tokenizer.eos_token_id,
                                       "pad_id": pad_id}, seed)


def _existing_model(directory: Path, tokenizer: PreTrainedTokenizerBase, own_tokenizer: bool) -> PreTrainedModel:
    """The model saved in ``directory``, checked against ``tokenizer``: every id has a row, and a tokenizer
    saved there too is the same one (the embeddings were trained for it)."""
    model = load_model(directory)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"--from {directory}: the model scores {model.config.vocab_size} ids but the tokenizer "
                         f"has {len(tokenizer)}: the vocabulary does not fit")
    if not own_tokenizer:
        try:
            saved = tokenizer_fingerprint(load_tokenizer(directory))
        except (OSError, ValueError):
            saved = None  # no tokenizer saved with the model
        if saved is not None and saved != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"--from {directory} holds another tokenizer than the one given, and its embeddings "
                             "were trained for that one: leave out --text/--tokenizer to keep it")
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``atkd-student init``."""
    parser.add_argument("--out", type=Path, required=True, help="directory to write (must not exist)")
    parser.add_argument("--text", type=Path, nargs="+", default=[],
                        help="train the tokenizer on these text files or directories of *.txt")
    parser.add_argument("--vocab-size", type=int, default=4096, help="size of the trained tokenizer (default: 4096)")
    parser.add_argument("--tokenizer", type=Path, help="reuse the tokenizer saved in this (tokenizer or model) "
                                                       "directory, e.g. the teacher's, so teacher and student share it")
    parser.add_argument("--family", choices=FAMILIES, help="a new model of this family")
    parser.add_argument("--size", default="student",
                        help=f"its size: one of {sorted(SIZES)} or HIDDENxLAYERSxHEADS (default: student)")
    parser.add_argument("--max-len", type=int, default=512, help="its context in positions (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of its initial weights (default: 0)")
    parser.add_argument("--from", dest="from_dir", type=Path,
                        help="instead of a new model, the one in this local Hugging Face model directory")


def run(args: argparse.Namespace) -> dict:
    """``atkd-student init`` with the parsed ``args`` of :func:`add_arguments`."""
    return init_model_dir(args.out, text=args.text, vocab_size=args.vocab_size, tokenizer_dir=args.tokenizer,
                          family=args.family, size=args.size, from_dir=args.from_dir, max_len=args.max_len,
                          seed=args.seed)
