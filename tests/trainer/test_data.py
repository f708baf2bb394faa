"""Dataset reading, checking, loss masks, packing and the step schedule (SmolLM2's real tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kubetune_trainer import data
from kubetune_trainer.data import IGNORE, DataError, Example, Schedule, Tokenizing


def learned(tokenizer: Any, example: Example) -> str:
    return str(tokenizer.decode([t for t in example.labels if t != IGNORE]))


def test_chat_loss_only_on_assistant_turns(tokenizer: Any) -> None:
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye."}]}
    example = Tokenizing(tokenizer, "chat")(row, "x line 1")
    assert learned(tokenizer, example) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    full = tokenizer.decode(example.input_ids)
    assert "Be brief." in full and "Hi there" in full and "Bye" in full
    assert len(example.input_ids) == len(example.labels)


@pytest.mark.parametrize(("fmt", "row", "expect_loss", "expect_prompt"), [
    ("alpaca", {"instruction": "Add", "input": "2+2", "output": "4"}, "4<|im_end|>", "### Input:\n2+2"),
    ("alpaca", {"instruction": "Say hi", "output": "hi"}, "hi<|im_end|>", "### Instruction:\nSay hi"),
    ("prompt-completion", {"prompt": "The sky is", "completion": " blue"}, " blue<|im_end|>", "The sky is"),
    ("text", {"text": "plain words"}, "plain words<|im_end|>", "plain words"),
])
def test_formats_mask_the_prompt(tokenizer: Any, fmt: str, row: dict[str, str], expect_loss: str,
                                 expect_prompt: str) -> None:
    example = Tokenizing(tokenizer, fmt)(row, "x")
    assert learned(tokenizer, example) == expect_loss
    assert expect_prompt in tokenizer.decode(example.input_ids)


@pytest.mark.parametrize(("fmt", "lines", "message"), [
    ("chat", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
              '{"messages": [{"role": "bot", "content": "a"}]}'],
     "train.jsonl line 2: field 'messages[0].role' must be one of system, user, assistant; got 'bot'"),
    ("chat", ['{"messages": [{"role": "user", "content": 3}]}'],
     "train.jsonl line 1: field 'messages[0].content' must be a string, got int"),
    ("chat", ['{"text": "x"}'], "train.jsonl line 1: missing field 'messages' (fields present: text)"),
    ("chat", ['{"messages": [{"role": "user", "content": "only a question"}]}'],
     "train.jsonl line 1: field 'messages' has no assistant message"),
    ("alpaca", ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'],
     "train.jsonl line 3: missing field 'output' (fields present: instruction)"),
    ("prompt-completion", ['{"prompt": "a", "completion": "b"}', "{not json"], "train.jsonl line 2: not valid JSON"),
    ("text", ['["a list"]'], "train.jsonl line 1: must be an object, got list"),
])
def test_bad_rows_name_line_and_field(tmp_path: Path, tokenizer: Any, fmt: str, lines: list[str],
                                      message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        data.build(data.read_rows(path, "train.jsonl"), Tokenizing(tokenizer, fmt), "train.jsonl", 128, True, 0)
    assert message in str(err.value)


def test_empty_and_all_too_long(tmp_path: Path, tokenizer: Any) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        data.build(data.read_rows(empty, "empty.jsonl"), Tokenizing(tokenizer, "text"), "empty.jsonl", 64, True, 0)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 200}) + "\n")
    with pytest.raises(DataError, match=r"all 1 rows are longer than training.maxSeqLength \(64 tokens\)"):
        data.build(data.read_rows(long, "long.jsonl"), Tokenizing(tokenizer, "text"), "long.jsonl", 64, True, 0)


def test_some_too_long_are_skipped_and_counted(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "word " * 200}) + "\n" + json.dumps({"text": "short"}) + "\n")
    ds = data.build(data.read_rows(path, "m"), Tokenizing(tokenizer, "text"), "m", 64, True, 0)
    assert ds.examples == 1 and ds.dropped_too_long == 1


def test_json_csv_parquet_read_the_same(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(3)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        got = data.read_rows(tmp_path / name, name)
        assert [r for _, r in got] == rows, name
    assert [w for w, _ in data.read_rows(tmp_path / "d.csv", "d.csv")] == ["line 2", "line 3", "line 4"]
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        (tmp_path / "d.txt").write_text("x")
        data.read_rows(tmp_path / "d.txt", "d.txt")


def test_packing_is_best_fit_and_loses_nothing() -> None:
    examples = [Example([1] * n, [1] * n) for n in (60, 50, 40, 30, 20, 10, 64, 5, 33)]
    rows = data.pack(examples, 64)
    assert all(sum(len(e) for e in row) <= 64 for row in rows)
    assert sorted(len(e) for row in rows for e in row) == sorted(len(e) for e in examples)
    lower_bound = -(-sum(len(e) for e in examples) // 64)
    assert len(rows) <= lower_bound + 1
    assert len(data.pack(examples, 64, enabled=False)) == len(examples)


def test_collate_restarts_positions_and_never_predicts_across_examples() -> None:
    a, b = Example([10, 11, 12], [IGNORE, 11, 12]), Example([20, 21], [20, 21])
    batch = data.collate([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [20, 21, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # targets[t] is the label of t+1 within the same example; the last token of each example predicts nothing
    assert batch["targets"].tolist() == [[11, 12, IGNORE, 21, IGNORE], [21, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_schedule_is_a_pure_function_of_step() -> None:
    schedule = Schedule(n_rows=10, micro_batch=2, accumulation=2, seed=3)
    assert schedule.steps_per_epoch == 3
    epoch0 = [i for s in range(3) for mb in schedule.step_rows(s) for i in mb]
    assert sorted(epoch0) == list(range(10))
    assert schedule.step_rows(1) == Schedule(10, 2, 2, 3).step_rows(1)
    assert schedule.step_rows(3) != schedule.step_rows(0)  # a new epoch reshuffles
    assert schedule.total_steps(2.0, None) == 6 and schedule.total_steps(1.0, 4) == 4
