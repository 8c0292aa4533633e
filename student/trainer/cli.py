"""``atkd-student``: make a starting model, train a student, evaluate it, or export teacher signals once.

    atkd-student init --text FILE... --family llama --size student --out DIR     (see atkd.student.initialise)
    atkd-student train --config run.yaml [--resume [CHECKPOINT]] [--dotted.key value ...]
    atkd-student eval --config run.yaml [--model DIR] [--split eval|train] [--dotted.key value ...]
    atkd-student export-cache --config run.yaml --out DIR [--shard-size 1024] [--dotted.key value ...]
    atkd-student generate --config run.yaml --out DIR [--block-size 64] [--greedy] [--dotted.key value ...]

Every field of :class:`~atkd.student.trainer.config.TrainConfig` can be set in the YAML file and overridden
with ``--section.field value`` (see :mod:`atkd.student.trainer.config`; ``--teacher null`` unsets a section).
Configuration errors name the field and exit with status 2; a teacher that does not fit the student exits
with status 3 before any step (so does a replica of another model revision, at any step); a teacher that
fails during the run (no replica answered within ``teacher.retry_budget_s``) with status 4. A run that
stops on a teacher error mid-run first writes the checkpoint of its last completed step, which
``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from atkd.proto.device import resolve_device
from atkd.proto.fingerprint import TeacherMismatchError, tokenizer_fingerprint
from atkd.student import initialise
from atkd.student.client import TeacherError, TeacherRevisionError
from atkd.student.client.generate import TeacherGenerator
from atkd.student.data.generated import (
    GenerationManifest,
    GenerationMismatchError,
    prompt_ids,
    prompts_fingerprint,
    write_generations,
)
from atkd.student.evaluation import evaluation_report
from atkd.student.models import load_model
from atkd.student.teachers import CacheManifest, CacheMismatchError, export_signals

from . import report
from .config import TrainConfig, describe_fields, load_config
from .loop import FINAL_DIR, train
from .parts import build_teacher, load_examples, load_tokenizer, teacher_client, teacher_identity

log = logging.getLogger("atkd-student")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="atkd-student", description="ATKD student: distil from a teacher")
    commands = parser.add_subparsers(dest="command", required=True)
    fields = argparse.RawDescriptionHelpFormatter
    epilog = ("config fields (YAML keys; each is also a flag, e.g. --teacher.mode local; --teacher null unsets "
              "a section):\n" + "\n".join(describe_fields()))
    init = commands.add_parser("init", help="train a tokenizer (or reuse one) and save a new model with it")
    initialise.add_arguments(init)
    run = commands.add_parser("train", help="distil the student (see the config's teacher, loss, optim)",
                              epilog=epilog, formatter_class=fields)
    run.add_argument("--resume", nargs="?", const=True, default=False, type=Path,
                     help="continue from the newest checkpoint in output_dir, or from CHECKPOINT")
    evaluate_cmd = commands.add_parser("eval", help="held-out perplexity and accuracy (+ ROUGE-L for instructions)",
                                       epilog=epilog, formatter_class=fields)
    evaluate_cmd.add_argument("--model", type=Path, help="model directory (default: output_dir/final)")
    evaluate_cmd.add_argument("--max-new-tokens", type=int, default=64, help="instruction data: generation length")
    evaluate_cmd.add_argument("--max-examples", type=int, default=200, help="instruction data: prompts to generate for")
    evaluate_cmd.add_argument("--split", choices=("eval", "train"), default="eval",
                              help="the data to evaluate on: data.eval (default), or data.train when asked")
    evaluate_cmd.add_argument("--generations", type=Path,
                              help="instruction data: JSONL of each prompt, reference, generation and ROUGE-L "
                                   "(default: output_dir/generations-<model directory name>.jsonl)")
    export = commands.add_parser("export-cache", help="score the training data once and write a signal cache",
                                 epilog=epilog, formatter_class=fields)
    export.add_argument("--out", type=Path, required=True, help="cache directory to write")
    export.add_argument("--shard-size", type=int, default=1024, help="examples per shard file")
    generate = commands.add_parser("generate", help="the teacher's responses to the training prompts (SeqKD data, "
                                   "data.source.generations), through the Generate RPC; resumable",
                                   epilog=epilog, formatter_class=fields)
    generate.add_argument("--out", type=Path, required=True, help="directory of generations.jsonl and manifest.json")
    generate.add_argument("--block-size", type=int, default=64, help="prompts written together (the unit of resume)")
    generate.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    report.add_parser(commands)
    for command in (run, evaluate_cmd, export, generate):
        command.add_argument("--config", type=Path, help="YAML file of the TrainConfig")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "report":
        return report.main(args, overrides, parser)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    if args.command == "init":
        if overrides:
            parser.error(f"init: unrecognized arguments: {' '.join(overrides)}")
        try:
            print(json.dumps(initialise.run(args)))
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            parser.exit(2, f"atkd-student init: {error}\n")
        return
    try:
        config = load_config(args.config, overrides)
    except (ValueError, OSError) as error:
        parser.exit(2, f"atkd-student: config error{f' in {args.config}' if args.config else ''}:\n{error}\n")
    try:
        if args.command == "train":
            result = train(config, resume=args.resume)
            print(json.dumps({"step": result.state.step, "tokens": result.state.tokens,
                              "stopped_early": result.stopped_early,
                              "final": str(result.final_dir) if result.final_dir else None,
                              "eval": asdict(result.eval) if result.eval else None}))
        elif args.command == "eval":
            print(json.dumps(run_eval(config, args.model, args.max_new_tokens, args.max_examples, split=args.split,
                                      generations=args.generations)))
        elif args.command == "generate":
            made = generate_responses(config, args.out, block_size=args.block_size, greedy=args.greedy)
            print(json.dumps({"generations": str(args.out), "prompts": made.num_prompts}))
        else:
            manifest = export_cache(config, args.out, args.shard_size)
            print(json.dumps({"cache": str(args.out), "examples": manifest.num_examples}))
    except (TeacherMismatchError, CacheMismatchError, TeacherRevisionError,
            GenerationMismatchError) as error:
        parser.exit(3, f"atkd-student: {error}{_resume_hint(error)}\n")
    except TeacherError as error:
        parser.exit(4, f"atkd-student: teacher failed: {error}{_resume_hint(error)}\n")
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"atkd-student: {error}\n")


def _resume_hint(error: Exception) -> str:
    checkpoint = getattr(error, "checkpoint", None)
    return "" if checkpoint is None else (f"\natkd-student: the run stopped at its checkpoint {checkpoint}; once the "
                                          "teacher serves again, continue with the same command and --resume")


def run_eval(config: TrainConfig, model_dir: Path | None, max_new_tokens: int, max_examples: int, *,
             split: str = "eval", generations: Path | None = None) -> dict:
    """:func:`~atkd.student.evaluation.evaluation_report` of the model in ``model_dir`` (default: the run's
    final model) on ``data.eval`` (``split="train"``: on ``data.train``), with ``"model"`` and ``"split"``
    added. Instruction data: the generations go to ``generations`` (default:
    ``output_dir/generations-<model directory name>.jsonl``). Without ``data.eval`` it raises ``ValueError``
    rather than evaluate on the training data unasked."""
    model_dir = Path(model_dir or Path(config.output_dir) / FINAL_DIR)
    tokenizer = load_tokenizer(config.tokenizer or config.student)
    examples = load_examples(config.data, tokenizer, split)
    if examples is None:
        raise ValueError("data.eval is not set: give held-out data (--data.eval FILE), or evaluate on the training "
                         "data with --split train")
    model = load_model(model_dir, device=str(resolve_device(config.device)))
    samples = generations or Path(config.output_dir) / f"generations-{model_dir.resolve().name}.jsonl"
    report = evaluation_report(model, tokenizer, examples, batch_size=config.batch_size,
                               max_batches=config.data.eval_batches, max_new_tokens=max_new_tokens,
                               max_generations=max_examples, samples_path=samples)
    return {"model": str(model_dir), "split": split, **report}


def export_cache(config: TrainConfig, out_dir: Path, shard_size: int) -> CacheManifest:
    """Score the training data with the config's teacher (remote or local) and write a signal cache."""
    teacher_config = config.teacher
    if teacher_config is None or teacher_config.mode == "cache":
        raise ValueError("export-cache needs teacher.mode remote or local")
    tokenizer = load_tokenizer(config.tokenizer or config.student)
    examples = load_examples(config.data, tokenizer, "train")
    student = load_model(config.student)
    teacher = build_teacher(teacher_config, tokenizer, student, examples, client_name="export-cache")
    model_id, revision = teacher_identity(teacher_config, teacher)
    shard_size = max(config.batch_size, shard_size // config.batch_size * config.batch_size)
    manifest = CacheManifest(
        teacher_model_id=model_id, teacher_revision=revision, tokenizer_hash=tokenizer_fingerprint(tokenizer),
        vocab_size=student.config.vocab_size, dataset_fingerprint=examples.fingerprint, dataset_kind=examples.kind,
        num_examples=len(examples), seq_len=examples.seq_len, top_k=teacher_config.top_k,
        tail_samples=teacher_config.tail_samples, tail_ids_only=teacher_config.ids_only,
        temperature=teacher_config.temperature,
        codec=teacher_config.codec if teacher_config.mode == "remote" else "fp32", shard_size=shard_size,
    )  # fmt: skip
    try:
        return export_signals(teacher, examples, out_dir, manifest, batch_size=config.batch_size,
                              prefetch=teacher_config.prefetch, seed=config.seed, progress=config.progress)
    finally:
        teacher.close()


def generate_responses(config: TrainConfig, out_dir: Path, *, block_size: int = 64,
                       greedy: bool = False) -> GenerationManifest:
    """The teacher's response to every training prompt, written to ``out_dir`` (:mod:`atkd.student.data.generated`):
    sampled with ``data.source``'s options (``max_new_tokens``, default ``data.seq_len``; temperature, top_p,
    top_k) and seed ``seed + i`` for prompt i, through the Generate RPC of the remote teacher section."""
    if config.teacher is None or config.teacher.mode != "remote":
        raise ValueError("generate needs teacher.mode remote (the teacher's Generate RPC)")
    if config.data.kind != "instruction":
        raise ValueError("generate needs instruction data (data.kind: instruction): prompts to answer")
    tokenizer = load_tokenizer(config.tokenizer or config.student)
    examples = load_examples(config.data, tokenizer, "train")
    vocab_size = AutoConfig.from_pretrained(config.student, local_files_only=True).vocab_size
    client = teacher_client(config.teacher, tokenizer, vocab_size, "atkd-student-generate")
    source, info = config.data.source, client.info()
    prompts = prompt_ids(examples)
    manifest = GenerationManifest(
        teacher_model_id=info.model_id, teacher_revision=info.model_revision,
        tokenizer_hash=tokenizer_fingerprint(tokenizer), vocab_size=vocab_size,
        prompts_fingerprint=prompts_fingerprint(prompts), num_prompts=len(prompts),
        max_new_tokens=source.max_new_tokens or examples.seq_len, temperature=source.temperature, top_p=source.top_p,
        top_k=source.top_k, greedy=greedy, seed=config.seed, block_size=block_size,
    )  # fmt: skip
    generator = TeacherGenerator(client)

    def generate(block, seed):
        return generator.generate(block, max_new_tokens=manifest.max_new_tokens, temperature=source.temperature,
                                  top_p=source.top_p, top_k=source.top_k, greedy=greedy,
                                  stop_token_ids=[tokenizer.eos_token_id], seed=seed)

    try:
        with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not config.progress) as bar:
            return write_generations(out_dir, manifest, prompts, examples.prompts, generate, tokenizer.decode,
                                     progress=bar.update)
    finally:
        client.close()


if __name__ == "__main__":
    main(sys.argv[1:])
