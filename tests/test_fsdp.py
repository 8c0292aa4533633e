"""Sharded students: ``parallel: fsdp`` under torchrun (FSDP2 on CPU, gloo, real subprocesses) takes the steps of
one process with gradient accumulation, resumes exactly from its sharded checkpoints, and trains in bf16."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atkd.student.trainer.loop import train
from tests.test_fused_head import without_key_bias
from tests.test_trainer import REPO, final_weights, run_config

pytestmark = pytest.mark.slow  # each torchrun launch imports torch and transformers twice: ~20-40 s here


def torchrun(config, *flags: str) -> str:
    """Run ``atkd-student train`` on 2 ranks; returns its stderr (the log)."""
    config_file = Path(config.output_dir).parent / f"{Path(config.output_dir).name}.json"
    config_file.write_text(config.model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "atkd.student.trainer.cli", "train", "--config", str(config_file), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def saved_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((Path(output_dir) / "final").glob("*.safetensors")))


def train_log(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture
def teacher(tiny_model_dir) -> dict:
    """The local teacher in every rank; tail samples are seeded by the global micro-batch number."""
    return {"mode": "local", "model": str(tiny_model_dir), "top_k": 16, "tail_samples": 4}


def test_fsdp_two_ranks_match_one_process_with_accumulation_and_resume_exactly(tmp_path, corpus, tiny_model_factory,
                                                                               teacher):
    """2 FSDP2 ranks x 4 examples take the steps of 1 process x 4 examples x 2 accumulation steps (fp32, fused head
    on both); a run resumed from the sharded checkpoint of step 3 ends bit-identical to the uninterrupted one."""
    student = tiny_model_factory("gpt2")  # tied embeddings: the head's weight is the input embedding's
    single = train(run_config(tmp_path / "single", corpus, student, teacher, max_steps=6, grad_accum=2, threads=1,
                              save_every=0))
    config = run_config(tmp_path / "fsdp", corpus, student, teacher, max_steps=6, save_every=3, keep_checkpoints=3,
                        threads=1, parallel="fsdp")
    assert "fused_head: on" in torchrun(config)
    log = train_log(config.output_dir)
    assert len(log) == 6 and log[-1]["tokens"] == 6 * 2 * 4 * 32
    checkpoint = config.output_dir / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    expected, sharded = final_weights(single), saved_weights(config.output_dir)
    assert expected.keys() == sharded.keys()
    worst = {name: (without_key_bias(name, expected[name]) - without_key_bias(name, sharded[name])).abs().max().item()
             for name in expected}
    assert max(worst.values()) < 1e-4, worst

    resumed = run_config(tmp_path / "resumed", corpus, student, teacher, max_steps=6, save_every=3, threads=1,
                         parallel="fsdp")
    shutil.copytree(checkpoint, resumed.output_dir / "checkpoints" / checkpoint.name)
    torchrun(resumed, "--resume")
    assert [r["step"] for r in train_log(resumed.output_dir)] == [4, 5, 6]
    again = saved_weights(resumed.output_dir)
    for name in sharded:
        assert torch.equal(again[name], sharded[name]), name


def test_fsdp_bf16_mixed_precision_trains_with_the_fused_head(tmp_path, corpus, tiny_model_factory, teacher):
    """precision=bf16 under FSDP2: bf16 compute, fp32 reduction and fp32 master weights; an untied GPT-NeoX head."""
    student = tiny_model_factory("gpt_neox")  # not the teacher (the tiny Llama): a loss to lower
    config = run_config(tmp_path / "bf16", corpus, student, teacher, max_steps=8, save_every=0, threads=1,
                        parallel="fsdp", precision="bf16", optim={"lr": 1e-2, "warmup": 0})
    assert "fused_head: on" in torchrun(config)
    losses = [r["loss"] for r in train_log(config.output_dir)]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    weights, initial = saved_weights(config.output_dir), load_file(next(Path(student).glob("*.safetensors")))
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert not torch.equal(weights["embed_out.weight"], initial["embed_out.weight"])
