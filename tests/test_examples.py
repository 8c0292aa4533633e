"""student/data/examples: packed windows, instruction records with masked prompts, and the batch order."""

from __future__ import annotations

import json

import pytest
import torch

from atkd.proto.alignment import IGNORE_INDEX
from atkd.student.data.examples import BatchOrder, InstructionData, PackedText
from atkd.student.data.instructions import dialogue_pairs


def test_packed_windows_tile_the_stream_and_shift_by_one():
    ids = torch.arange(100)
    data = PackedText(ids, seq_len=8)
    assert len(data) == 12  # (100 - 1) // 8
    batch = data.batch([0, 11])
    assert batch.input_ids[0].tolist() == list(range(0, 8))
    assert batch.targets[0].tolist() == list(range(1, 9))
    assert batch.input_ids[1].tolist() == list(range(88, 96))
    assert batch.example_ids.tolist() == [0, 11]
    with pytest.raises(ValueError, match="need at least 9 tokens"):
        PackedText(torch.arange(5), seq_len=8)


def test_fingerprint_tells_datasets_apart():
    ids = torch.arange(100)
    assert PackedText(ids, 8).fingerprint == PackedText(ids.clone(), 8).fingerprint
    assert PackedText(ids, 8).fingerprint != PackedText(ids, 9).fingerprint
    changed = ids.clone()
    changed[50] = 7
    assert PackedText(ids, 8).fingerprint != PackedText(changed, 8).fingerprint


def test_instruction_targets_cover_the_response_only(tiny_tokenizer, tmp_path):
    records = [{"prompt": "Who is there?", "response": " Nay, answer me."},
               {"q": "A very long question " * 20, "a": "short"}]
    data = InstructionData(records[:1], tiny_tokenizer, seq_len=32)
    prompt = tiny_tokenizer("Who is there?", add_special_tokens=False)["input_ids"]
    response = tiny_tokenizer(" Nay, answer me.", add_special_tokens=False)["input_ids"]
    full = prompt + response + [tiny_tokenizer.eos_token_id]
    row_ids, row_targets = data.input_ids[0], data.targets[0]
    assert row_ids[: len(full) - 1].tolist() == full[:-1]
    learnt = row_targets != IGNORE_INDEX
    # exactly the response tokens and the eos are targets, each predicted from the token before it
    assert row_targets[learnt].tolist() == response + [tiny_tokenizer.eos_token_id]
    assert learnt.nonzero().flatten().tolist() == list(range(len(prompt) - 1, len(full) - 1))
    assert row_ids[len(full) - 1] == tiny_tokenizer.eos_token_id  # the last target is an input too (join_window)
    assert (row_ids[len(full) :] == tiny_tokenizer.pad_token_id).all()

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[1:]) + "\n")
    truncated = InstructionData.from_jsonl(path, tiny_tokenizer, seq_len=16, prompt_field="q", response_field="a")
    assert (truncated.targets == IGNORE_INDEX).all()  # the prompt fills the window: nothing to learn
    assert truncated.prompts == [records[1]["q"]] and truncated.responses == ["short"]


def test_instruction_records_are_validated(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="record 2: field 'response' must be a string"):
        InstructionData([{"prompt": "a", "response": "b"}, {"prompt": "a"}], tiny_tokenizer, 16)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON object"):
        InstructionData.from_jsonl(path, tiny_tokenizer, 16)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(num_examples=10, batch_size=3, seed=5)
    assert order.per_epoch == 3  # one example of each epoch's permutation is left out
    epoch0 = torch.cat([order.indices(m) for m in range(3)])
    epoch1 = torch.cat([order.indices(m) for m in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1)
    again = BatchOrder(num_examples=10, batch_size=3, seed=5)
    assert torch.equal(again.indices(4), order.indices(4))  # a resumed run sees the same micro-batch 4
    assert not torch.equal(BatchOrder(10, 3, seed=6).indices(0), order.indices(0))


def test_ranks_split_the_global_batch_like_gradient_accumulation():
    single = BatchOrder(num_examples=40, batch_size=4, seed=0)
    ranks = [BatchOrder(num_examples=40, batch_size=4, seed=0, world_size=2, rank=r) for r in range(2)]
    for step in range(8):  # crosses an epoch boundary (5 micro-batches per rank and epoch)
        assert torch.equal(ranks[0].indices(step), single.indices(2 * step))
        assert torch.equal(ranks[1].indices(step), single.indices(2 * step + 1))
    with pytest.raises(ValueError, match="do not fill one global batch"):
        BatchOrder(num_examples=7, batch_size=4, seed=0, world_size=2)


def test_dialogue_pairs_answer_a_cue_in_the_next_speakers_voice():
    text = ("DUKE.\nHapless Aegeon, whom the fates\nhave mark'd.\n\nGAOLER.\nI will, my lord.\n\n[Exeunt.]\n\n"
            "AEGEON.\nHopeless.\n\nAEGEON.\nAgain.")
    assert dialogue_pairs(text) == [{"prompt": "Duke: Hapless Aegeon, whom the fates have mark'd.\nGaoler:",
                                     "response": " I will, my lord."}]
