"""``atkd-student init``: a tokenizer trained on the user's text and a model saved with it, ready for ``train``
and ``atkd-teacher serve``; a teacher and a student built from one tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atkd.proto.fingerprint import tokenizer_fingerprint
from atkd.services.teacher.cli import parse_config
from atkd.services.teacher.engine import TeacherEngine
from atkd.student.initialise import init_model_dir, parse_size
from atkd.student.trainer.cli import main
from atkd.student.trainer.loop import train
from atkd.student.trainer.parts import load_tokenizer
from tests.test_trainer import run_config

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def init(capsys, *args: str) -> dict:
    """``atkd-student init ARGS`` in this process; its printed summary."""
    main(["init", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, excerpt_paragraphs) -> Path:
    """The user's corpus as a directory of two .txt files."""
    root = tmp_path_factory.mktemp("my_text")
    (root / "a.txt").write_text("\n\n".join(excerpt_paragraphs[:200]))
    (root / "b.txt").write_text("\n\n".join(excerpt_paragraphs[200:]))
    return root


def test_a_teacher_and_a_student_share_one_tokenizer_serve_and_train(tmp_path, capsys, text_dir, corpus):
    teacher_dir, student_dir = tmp_path / "teacher_init", tmp_path / "student_init"
    teacher = init(capsys, "--text", str(text_dir), "--vocab-size", "400", "--family", "llama", "--size", "32x2x2",
                   "--max-len", "128", "--out", str(teacher_dir))
    student = init(capsys, "--tokenizer", str(teacher_dir), "--family", "gpt2", "--size", "16x1x2", "--max-len", "128",
                   "--out", str(student_dir))
    assert teacher["tokenizer_fingerprint"] == student["tokenizer_fingerprint"]
    assert teacher["tokens"] == student["vocab_size"] == teacher["vocab_size"] == 400
    assert (teacher["model_type"], student["model_type"]) == ("llama", "gpt2")
    for directory in (teacher_dir, student_dir):
        assert TOKENIZER_FILES | {"config.json", "model.safetensors"} <= {p.name for p in directory.iterdir()}
    assert tokenizer_fingerprint(load_tokenizer(teacher_dir)) == tokenizer_fingerprint(load_tokenizer(student_dir))

    # What `atkd-teacher serve --model teacher_init` loads: the config, then the engine with the student's tokenizer.
    config = parse_config(["serve", "--model", str(teacher_dir), "--port", "0", "--http-port", "0"])
    engine = TeacherEngine.load(config.model)
    assert engine.model_id == "teacher_init" and engine.vocab_size == 400
    assert engine.tokenizer_hash == student["tokenizer_fingerprint"]

    # The teacher is pre-trained from its init directory with SFT, and the student distils from it.
    data = {"train": str(corpus["train"]), "eval": str(corpus["eval"]), "seq_len": 32, "eval_batches": 2}
    pretrained = train(run_config(tmp_path / "pretrain", corpus, teacher_dir, None, max_steps=2, data=data,
                                  **{"loss.name": "sft"}))
    assert pretrained.state.step == 2 and TOKENIZER_FILES <= {p.name for p in pretrained.final_dir.iterdir()}
    distilled = train(run_config(tmp_path / "distil", corpus, student_dir,
                                 {"mode": "local", "model": str(pretrained.final_dir), "top_k": 8}, max_steps=2,
                                 data=data))
    assert distilled.state.step == 2


def test_the_same_seed_gives_the_same_model_and_another_seed_another(tmp_path, text_dir):
    options = dict(text=[text_dir], vocab_size=300, family="opt", size="16x1x2", max_len=64)
    init_model_dir(tmp_path / "a", seed=3, **options)
    init_model_dir(tmp_path / "b", seed=3, **options)
    init_model_dir(tmp_path / "c", seed=4, **options)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()


def test_from_an_existing_model_keeps_its_tokenizer_and_checks_the_vocabulary_fits(tmp_path, text_dir):
    small = init_model_dir(tmp_path / "small", text=[text_dir], vocab_size=300, family="gpt2", size="16x1x2")
    assert small["vocab_size"] == 300
    copied = init_model_dir(tmp_path / "copy", from_dir=tmp_path / "small")  # its own tokenizer, a new model id
    assert copied["tokenizer_fingerprint"] == small["tokenizer_fingerprint"]
    assert TeacherEngine.load(tmp_path / "copy").model_id == "copy"
    same = load_file(tmp_path / "small" / "model.safetensors")
    assert all(torch.equal(same[n], w) for n, w in load_file(tmp_path / "copy" / "model.safetensors").items())

    init_model_dir(tmp_path / "big_tokenizer", text=[text_dir], vocab_size=500, family="gpt2", size="16x1x2")
    with pytest.raises(ValueError, match="scores 300 ids but the tokenizer has 500"):
        init_model_dir(tmp_path / "x", from_dir=tmp_path / "small", tokenizer_dir=tmp_path / "big_tokenizer")
    init_model_dir(tmp_path / "other_300", text=[text_dir / "a.txt"], vocab_size=300, family="gpt2", size="16x1x2")
    with pytest.raises(ValueError, match="holds another tokenizer"):
        init_model_dir(tmp_path / "y", from_dir=tmp_path / "small", tokenizer_dir=tmp_path / "other_300")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_options_exit_with_status_2_and_write_nothing(tmp_path, capsys, text_dir):
    assert parse_size("teacher") == {"hidden": 256, "layers": 4, "heads": 4}
    assert parse_size("64x3x4") == {"hidden": 64, "layers": 3, "heads": 4}
    for args, message in [
        (["--size", "huge"], "expected one of ['student', 'teacher'] or HIDDENxLAYERSxHEADS"),
        (["--size", "30x2x4"], "multiple of the heads"),
        (["--vocab-size", "100"], "at least 258"),
        (["--text", str(tmp_path / "missing.txt")], "no such text file"),
    ]:
        argv = ["init", "--text", str(text_dir), "--family", "llama", "--out", str(tmp_path / "out"), *args]
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        main(["init", "--text", str(text_dir), "--family", "llama", "--out", str(tmp_path / "out")])
    assert "exists" in capsys.readouterr().err
