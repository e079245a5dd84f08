"""Capability tasks as local JSONL files: multiple choice and generation, with few-shot prompts.

    multiple_choice  {"context": "...", "choices": ["...", ...], "answer": k}
    generate         {"prompt": "...", "answers": ["...", ...]}

Few-shot (`num_fewshot: k`) follows lm-evaluation-harness's layout: k solved examples, each `context +
delimiter + answer` (`prompt + delimiter + answers[0]`), joined by `fewshot_delimiter` and followed by it, then
the example itself. They are drawn from `fewshot_path` (the task's train split) or, without one, from the task
file itself leaving the example out, with `random.Random(seed)`: the same prompts for every version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

from lmadapt.files.paths import open_regular

FORMATS = ("multiple_choice", "generate")


class TaskError(ValueError):
    """A task file or setting is wrong; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
    text: str  # the context (multiple choice) or prompt (generate)
    choices: tuple[str, ...] = ()  # multiple choice
    answer: int = 0  # multiple choice: index into choices
    answers: tuple[str, ...] = ()  # generate: every acceptable answer

    @property
    def target(self) -> str:
        """What a solved few-shot example shows after its context."""
        return self.choices[self.answer] if self.choices else self.answers[0]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    format: str
    examples: tuple[Example, ...]
    fewshot_pool: tuple[Example, ...] | None  # None: draw from `examples`, leaving the current one out
    num_fewshot: int = 0
    seed: int = 1234
    delimiter: str = " "  # between a context and its answer
    fewshot_delimiter: str = "\n\n"
    fingerprint: str = ""  # sha256 of the files and the settings: keys stored results

    def prompt(self, i: int) -> str:
        """Example i's few-shot prefix and context: byte-identical for every version and run."""
        ex = self.examples[i]
        if not self.num_fewshot:
            return ex.text
        pool = self.fewshot_pool if self.fewshot_pool is not None else self.examples[:i] + self.examples[i + 1:]
        shots = random.Random(f"{self.seed}:{i}").sample(pool, min(self.num_fewshot, len(pool)))
        return "".join(s.text + self.delimiter + s.target + self.fewshot_delimiter for s in shots) + ex.text


def load_task(name: str, path: str, format: str, *, num_fewshot: int = 0, fewshot_path: str | None = None,
              seed: int = 1234, delimiter: str = " ", fewshot_delimiter: str = "\n\n") -> Task:
    """Read and check a task file (and its few-shot file); TaskError naming file:line and the field."""
    if format not in FORMATS:
        raise TaskError(f"task {name!r}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if num_fewshot < 0:
        raise TaskError(f"task {name!r}: num_fewshot={num_fewshot}; expected an integer >= 0")
    examples, digest = _read(path, format)
    pool, pool_digest = _read(fewshot_path, format) if fewshot_path else (None, "")
    if num_fewshot and len(pool if pool is not None else examples[1:]) < num_fewshot:
        raise TaskError(f"task {name!r}: num_fewshot={num_fewshot} but only "
                        f"{len(pool) if pool is not None else len(examples) - 1} examples to draw them from")
    settings = json.dumps([format, num_fewshot, seed, delimiter, fewshot_delimiter, digest, pool_digest])
    return Task(name, format, examples, pool, num_fewshot, seed, delimiter, fewshot_delimiter,
                hashlib.sha256(settings.encode()).hexdigest()[:16])


def _read(path: str, format: str) -> tuple[tuple[Example, ...], str]:
    """(examples, sha256 of the file) of a JSONL task file; blank lines are skipped."""
    with open_regular(path, TaskError) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start})") from None
    examples = []
    for n, line in enumerate(text.split("\n"), start=1):  # "\n" only: a \x85 inside a string is text
        if line.strip():
            examples.append(_example(_record(line, path, n), format, f"{path}:{n}"))
    if not examples:
        raise TaskError(f"{path}: no examples (one JSON object per line)")
    return tuple(examples), hashlib.sha256(raw).hexdigest()


def _record(line: str, path: str, n: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TaskError(f"{path}:{n}: not JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(record, dict):
        raise TaskError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
    return record


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in record:
        raise TaskError(f"{where}: missing field {key!r}")
    value = record[key]
    if kind is list:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise TaskError(f"{where}: field {key!r} has value {value!r}; expected a non-empty list of strings")
    elif not isinstance(value, kind) or isinstance(value, bool):
        raise TaskError(f"{where}: field {key!r} has value {value!r}; expected {kind.__name__}")
    return value


def _example(record: dict[str, Any], format: str, where: str) -> Example:
    if format == "generate":
        return Example(_field(record, "prompt", str, where), answers=tuple(_field(record, "answers", list, where)))
    choices = _field(record, "choices", list, where)
    answer = _field(record, "answer", int, where)
    if not 0 <= answer < len(choices):
        raise TaskError(f"{where}: field 'answer' has value {answer}; expected an index into its "
                        f"{len(choices)} choices (0..{len(choices) - 1})")
    return Example(_field(record, "context", str, where), choices=tuple(choices), answer=answer)


def fixed_labels(task: Task) -> Sequence[str] | None:
    """The choices when every example has the same ones (a label set: P/R/F1 and a confusion matrix apply)."""
    first = task.examples[0].choices
    return list(first) if task.format == "multiple_choice" and all(e.choices == first for e in task.examples) \
        else None
