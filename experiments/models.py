"""The grid's models, built once per scale and cached: a tokenizer, the teachers of each size, the student.

- Tokenizer: a byte-level BPE of ``scale.vocab_size`` trained on the pre-training text.
- Teachers (``scale.teachers``, one family): pre-trained for ``teacher_pretrain_steps`` on the pre-training
  text, warming up over the first 5 % of them (the **lm** task's teacher), then fine-tuned with SFT on the
  instruction pairs for ``teacher_sft_steps`` (the **instruction** task's teacher, like the paper's SFT
  teachers). Every size gets the same steps and batches, and the students' learning rate unless
  ``scale.teacher_lr`` gives the size a lower one (as model families lower it with size).
- Student: ``scale.student`` dims, from a short common pre-training (``student_pretrain_steps``) on the same
  text; every run of the grid starts from these weights.

:func:`evaluate_model` is the one evaluation of the grid (teachers, the student before training, every run):
perplexity and next-token accuracy on the task's test split and, for the instruction task, the ROUGE-L F1
of greedy responses. :func:`uncertainty_histogram` describes what ATKD splits: the teacher's UnC = 1 - p_g on
validation tokens, easy and hard by the median split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from atkd.student.data.corpus import atomic_dir, cache_dir
from atkd.student.data.examples import Examples, InstructionData, PackedText
from atkd.student.data.lm import encode_corpus, random_batches
from atkd.student.data.tokenizer import train_tokenizer
from atkd.student.evaluation import evaluation_report
from atkd.student.losses import split_hard
from atkd.student.models import build_model, load_model, save_model
from atkd.student.optim import OptimConfig
from atkd.student.pretrain import pretrain
from atkd.student.trainer.config import DataConfig, LossConfig, TrainConfig
from atkd.student.trainer.loop import train

from .data import TaskData, prepare_tasks
from .grid import Scale

log = logging.getLogger(__name__)
UNC_BINS = 20


@dataclass(frozen=True)
class Assets:
    root: Path
    data: TaskData
    tokenizer_dir: Path
    student_init: Path
    teachers: dict[tuple[str, str], Path]  # (task, size) -> model directory

    def params(self, size: str) -> int:
        model = load_model(self.teachers[("lm", size)])
        return sum(p.numel() for p in model.parameters())


def build_assets(scale: Scale, cache: Path | None = None, threads: int = 2, sizes: Iterable[str] | None = None
                 ) -> Assets:
    """Build (or reuse) the data, tokenizer, student initialisation and teachers of ``scale`` (those of
    ``sizes`` only, when given) under ``<cache>/experiments/<scale.name>-<scale.build_key()>/``; each model is
    written atomically."""
    root = (cache or cache_dir()) / "experiments" / f"{scale.name}-{scale.build_key()}"
    data = prepare_tasks(root / "data", lm_source=scale.lm_source, max_pairs=scale.max_pairs)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer_dir = root / "tokenizer"
        if not tokenizer_dir.is_dir():
            log.info("training a %d-token BPE", scale.vocab_size)
            with atomic_dir(tokenizer_dir) as tmp:
                paragraphs = data.pretrain_text.read_text(encoding="utf-8").split("\n\n")
                train_tokenizer(paragraphs, scale.vocab_size, tmp)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ids = None

        def pretrained(directory: Path, dims: dict, seed: int, steps: int, lr: float) -> Path:
            nonlocal ids
            if not directory.is_dir():
                if ids is None:
                    ids = encode_corpus(data.pretrain_text.read_text(encoding="utf-8"), tokenizer)
                log.info("pre-training %s (%s) for %d steps", directory.name, dims, steps)
                model = build_model(scale.family, len(tokenizer), dims, seed)
                pretrain(model, random_batches(ids, scale.batch_size, scale.seq_len, seed), steps,
                         OptimConfig(lr=lr, warmup=max(20, steps // 20)))
                with atomic_dir(directory) as tmp:
                    save_model(model, tmp, tokenizer=tokenizer, model_id=directory.name)
            return directory

        student_init = pretrained(root / "student_init", scale.student, 1, scale.student_pretrain_steps, scale.lr)
        teachers = {}
        for size, dims in scale.teachers.items():
            if sizes is not None and size not in sizes:
                continue
            recipe, key = scale.teacher_recipe(size), scale.teacher_key(size)
            teachers[("lm", size)] = pretrained(root / f"teacher-lm-{size}-{key}", dims, 0, recipe["pretrain_steps"],
                                                recipe["lr"])
            if "instruction" in scale.tasks:
                teachers[("instruction", size)] = fine_tuned(scale, data, teachers[("lm", size)],
                                                             root / f"teacher-instruction-{size}-{key}", recipe["lr"],
                                                             threads)
    finally:
        torch.set_num_threads(previous_threads)
    return Assets(root, data, tokenizer_dir, student_init, teachers)


def fine_tuned(scale: Scale, data: TaskData, pretrained: Path, directory: Path, lr: float, threads: int) -> Path:
    """SFT of a pre-trained teacher on the instruction task's training pairs (the training job itself, loss
    ``sft``); its ``final/`` model directory."""
    final = directory / "final"
    if not final.is_dir():
        log.info("fine-tuning %s on the instruction task for %d steps", pretrained.name, scale.teacher_sft_steps)
        config = TrainConfig(
            student=pretrained, output_dir=directory, run_name=directory.name,
            data=DataConfig(kind="instruction", train=[data.instruction["train"]], seq_len=scale.seq_len),
            loss=LossConfig(name="sft"), optim=OptimConfig(lr=lr), batch_size=scale.batch_size,
            max_steps=scale.teacher_sft_steps, save_every=0, keep_checkpoints=1, threads=threads, progress=False,
        )  # fmt: skip
        train(config)
    return final


def split_examples(scale: Scale, task: str, data: TaskData, tokenizer: PreTrainedTokenizerBase,
                  split: str = "test") -> Examples:
    path = data.files(task)[split]
    if task == "lm":
        return PackedText.from_files([path], tokenizer, scale.seq_len)
    return InstructionData.from_jsonl(path, tokenizer, scale.seq_len)


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scale: Scale, task: str,
                   data: TaskData, split: str = "test") -> dict:
    """``{"perplexity", "accuracy", "tokens", "examples", "rouge_l"}`` on the first ``scale.test_examples``
    examples of ``split``; ``rouge_l`` (F1 in [0, 1], greedy responses to the first ``scale.generations``
    prompts) for the instruction task, else None."""
    examples = split_examples(scale, task, data, tokenizer, split)
    batch_size = 16
    report = evaluation_report(model, tokenizer, examples, batch_size=batch_size,
                               max_batches=-(-scale.test_examples // batch_size), max_new_tokens=scale.max_new_tokens,
                               max_generations=scale.generations)
    return {"perplexity": report["perplexity"], "accuracy": report["accuracy"], "tokens": report["tokens"],
            "examples": min(len(examples), scale.test_examples),
            "rouge_l": report["rouge_l"] / 100 if "rouge_l" in report else None}


def uncertainty_histogram(model: PreTrainedModel, examples: Examples, max_examples: int = 256) -> dict:
    """The teacher's UnC = 1 - p_g over the valid targets of the first ``max_examples`` examples, split into
    easy / hard by ATKD's median rule (:func:`~atkd.student.losses.split_hard`), as ``UNC_BINS``-bin
    histograms over [0, 1]: ``{"edges", "easy", "hard", "mean_easy", "mean_hard", "hard_fraction"}``."""
    uncertainties = []
    with torch.inference_mode():
        for start in range(0, min(len(examples), max_examples), 16):
            batch = examples.batch(range(start, min(start + 16, len(examples), max_examples)))
            logprobs = model(batch.input_ids).logits.float().log_softmax(-1)
            valid = batch.targets != -100
            target_logprob = logprobs.gather(-1, batch.targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            uncertainties.append(1 - target_logprob[valid].exp())
    unc = torch.cat(uncertainties)
    hard = split_hard(unc, "median")
    edges = torch.linspace(0, 1, UNC_BINS + 1)

    def counts(values: torch.Tensor) -> list[int]:
        return torch.histc(values, bins=UNC_BINS, min=0, max=1).long().tolist()

    return {"edges": [round(e, 4) for e in edges.tolist()], "easy": counts(unc[~hard]), "hard": counts(unc[hard]),
            "mean_easy": unc[~hard].mean().item(), "mean_hard": unc[hard].mean().item(),
            "hard_fraction": hard.float().mean().item()}


def write_model_results(scale: Scale, assets: Assets, results_dir: Path) -> None:
    """``teachers/<task>-<size>.json`` (test metrics and the UnC histogram) and ``teachers/<task>-student_init
    .json`` (the student before training) under ``results_dir``, unless written for this build already."""
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    out = Path(results_dir) / "teachers"
    out.mkdir(parents=True, exist_ok=True)
    for task in scale.tasks:
        for size in [*(size for size in scale.teachers if (task, size) in assets.teachers), "student_init"]:
            path = out / f"{task}-{size}.json"
            build = scale.build_key() if size == "student_init" else scale.teacher_key(size)
            if path.is_file() and json.loads(path.read_text()).get("build") == build:
                continue
            directory = assets.student_init if size == "student_init" else assets.teachers[(task, size)]
            model = load_model(directory)
            record = {"task": task, "size": size, "params": sum(p.numel() for p in model.parameters()),
                      "build": build, "recipe": None if size == "student_init" else scale.teacher_recipe(size),
                      "test": evaluate_model(model, tokenizer, scale, task, assets.data)}
            if size != "student_init":
                validation = split_examples(scale, task, assets.data, tokenizer, "validation")
                record["unc"] = uncertainty_histogram(model, validation)
            path.write_text(json.dumps(record, indent=1) + "\n")
