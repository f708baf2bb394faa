"""The dataset: read rows (JSONL / JSON / Parquet / CSV), check them, tokenize them with loss masks, and pack
them into rows of at most maxSeqLength tokens with no padding waste.

Every problem is found here, before the model is loaded (no GPU time spent on a bad file), and named with
its file, line and field: `train.jsonl line 7: field 'messages[1].role' must be one of system, user,
assistant; got 'bot'`.

Packing: best-fit-decreasing into rows of maxSeqLength tokens. Each example keeps its own positions
(position_ids restart at 0), and no attention mask is passed, so transformers builds a block-diagonal causal
mask: tokens never attend across examples. A micro-batch pads only to its longest packed row (near-full).
"""

from __future__ import annotations

import bisect
import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import SpecError

IGNORE = -100
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(SpecError):
    """The dataset is unusable (exit code 2)."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Dataset:
    rows: list[list[Example]]  # packed rows; each row holds whole examples, at most max_len tokens
    examples: int
    dropped_too_long: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


# --- reading ------------------------------------------------------------------------------------------

def read_rows(path: Path, label: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs: where is 'line N' (JSONL, CSV) or 'row N' (JSON, Parquet)."""
    if not path.is_file():
        raise DataError(f"{label}: no such file {path}")
    suffix = path.suffix.lower()
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, label, f"line {number}")
                if not line.strip():
                    continue
                rows.append((f"line {number}", _json(line, label, f" line {number}")))
    elif suffix == ".json":
        data = _json(_decode(path.read_bytes(), label, "file"), label, "")
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{label}: a .json dataset must be a list of objects (or {{'data': [...]}})")
        rows = [(f"row {i + 1}", row) for i, row in enumerate(data)]
    elif suffix == ".csv":
        rows = _csv_rows(path, label)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{label}: not a readable Parquet file ({exc})") from None
        rows = [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    else:
        raise DataError(f"{label}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{label} {where}: must be an object, got {type(row).__name__}")
    return rows


def _decode(raw: bytes, label: str, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{label} {where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "is this a binary file?") from None


def _json(text: str, label: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"{label}{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{label}{where}: not valid JSON (nested too deeply)") from None


def _csv_rows(path: Path, label: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file with a header; a row with more or fewer fields than the header is refused."""
    text = _decode(path.read_bytes(), label, "file")
    reader = csv.reader(text.splitlines(keepends=True))
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{label}: empty CSV file (a header row naming the fields comes first)")
        for values in reader:
            where = f"line {reader.line_num}"
            if not values:
                continue
            if len(values) != len(header):
                shown = ", ".join(header)
                extra = f"; unexpected field {len(header) + 1} ({values[len(header)][:40]!r})" \
                    if len(values) > len(header) else f"; field '{header[len(values)]}' is missing"
                raise DataError(f"{label} {where}: {len(values)} fields, but the header names {len(header)} "
                                f"({shown}){extra}")
            rows.append((where, dict(zip(header, values, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{label} line {reader.line_num}: not valid CSV ({exc})") from None
    return rows


# --- checking and tokenizing ------------------------------------------------------------------------

def _text(row: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if not required:
            return ""
        present = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: missing field '{name}' (fields present: {present})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def check_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = row.get("messages")
    if messages is None:
        present = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: missing field 'messages' (fields present: {present})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field 'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'messages[{i}].content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field 'messages' has no assistant message (nothing to learn from)")
    return out


class Tokenizing:
    """Turns checked rows into (input_ids, labels) with loss only where the format says."""

    def __init__(self, tokenizer: Any, data_format: str) -> None:
        self.tokenizer = tokenizer
        self.format = data_format
        self.eos = tokenizer.eos_token_id
        if data_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("spec.dataset.format: chat needs a tokenizer with a chat template; this model has none "
                            "(use alpaca, prompt-completion or text)")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, row: dict[str, Any], where: str) -> Example:
        if self.format == "chat":
            return self.chat(check_messages(row, where))
        if self.format == "alpaca":
            instruction = _text(row, "instruction", where)
            extra = _text(row, "input", where, required=False)
            output = _text(row, "output", where)
            prompt = (ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT).format(instruction=instruction,
                                                                                        input=extra)
            return self.pair(prompt, output)
        if self.format == "prompt-completion":
            return self.pair(_text(row, "prompt", where), _text(row, "completion", where))
        ids = self._bos() + self._ids(_text(row, "text", where)) + [self.eos]
        return Example(ids, list(ids))

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None and getattr(self.tokenizer, "add_bos_token", False) else []

    def pair(self, prompt: str, completion: str) -> Example:
        head = self._bos() + self._ids(prompt)
        tail = [*self._ids(completion), self.eos]
        return Example(head + tail, [IGNORE] * len(head) + tail)

    def chat(self, messages: list[dict[str, str]]) -> Example:
        """The chat template renders the conversation; assistant turns (their content and end-of-turn token)
        are found by rendering each prefix, so any template works, and only they carry loss."""
        template = self.tokenizer.apply_chat_template
        text = template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
            end = len(template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [IGNORE] * len(ids)
        for index, (begin, _end) in enumerate(encoded["offset_mapping"]):
            if any(s <= begin < e for s, e in spans):
                labels[index] = ids[index]
        return Example(ids, labels)


# --- packing ------------------------------------------------------------------------------------------

def pack(examples: list[Example], capacity: int, enabled: bool = True) -> list[list[Example]]:
    """Best-fit decreasing: each example goes into the fullest row it still fits in."""
    if not enabled:
        return [[e] for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        size = len(examples[i])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(examples[i])
            bisect.insort(free, (room - size, row))
        else:
            rows.append([examples[i]])
            bisect.insort(free, (capacity - size, len(rows) - 1))
    return rows


def build(rows: list[tuple[str, dict[str, Any]]], tokenize: Tokenizing, label: str, max_len: int, packing: bool,
          seed: int) -> Dataset:
    if not rows:
        raise DataError(f"{label}: the dataset is empty (no rows)")
    examples, too_long = [], 0
    for where, row in rows:
        example = tokenize(row, f"{label} {where}")
        if not any(t != IGNORE for t in example.labels):
            raise DataError(f"{label} {where}: no tokens to learn from after tokenizing (empty output?)")
        if len(example) > max_len:
            too_long += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"{label}: all {len(rows)} rows are longer than training.maxSeqLength ({max_len} tokens); "
                        "raise spec.training.maxSeqLength or shorten the rows")
    random.Random(seed).shuffle(examples)
    packed = pack(examples, max_len, packing)
    tokens = sum(len(e) for e in examples)
    return Dataset(
        rows=packed, examples=len(examples), dropped_too_long=too_long, tokens=tokens,
        loss_tokens=sum(sum(1 for t in e.labels if t != IGNORE) for e in examples),
        stats={"rows": len(packed), "fill": round(tokens / (len(packed) * max_len), 3) if packing else None},
    )


def split_eval(rows: list[tuple[str, dict[str, Any]]], fraction: float, seed: int
               ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# --- batching -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Which packed rows each optimizer step uses: a pure function of (seed, step), so a resumed run sees
    exactly the batches the uninterrupted run would have seen (the data position is just the step)."""

    n_rows: int
    micro_batch: int
    accumulation: int
    seed: int

    @property
    def micro_batches_per_epoch(self) -> int:
        return -(-self.n_rows // self.micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.micro_batches_per_epoch // self.accumulation)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps:
            return max_steps
        return max(1, round(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_rows(self, step: int) -> list[list[int]]:
        """Row indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = list(range(self.n_rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        first = k * self.accumulation * self.micro_batch
        last = min(self.n_rows, first + self.accumulation * self.micro_batch)
        return [order[i:min(i + self.micro_batch, last)] for i in range(first, last, self.micro_batch)]


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, Any]:
    """Packed rows -> input_ids, labels (already shifted: labels[t] is the target of position t),
    position_ids restarting per example; padding only up to the longest row here."""
    import torch

    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example)
            ids[r, at:at + n] = torch.tensor(example.input_ids)
            targets[r, at:at + n - 1] = torch.tensor(example.labels[1:])  # never predict across examples
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding tail is its own segment
    return {"input_ids": ids, "targets": targets, "position_ids": positions}


def iter_batches(rows: list[list[Example]], micro_batch: int) -> Iterator[list[list[Example]]]:
    for start in range(0, len(rows), micro_batch):
        yield rows[start:start + micro_batch]
