"""Instruction-tuning data for causal language models: GSM8K, the LLM-Adapters commonsense and
arithmetic suites, and plain JSON/JSONL files.

Row formats, recognised by their columns:
- LLM-Adapters: {"instruction", "input", "output", "answer"}; "input" may be left out. The options of a
  multiple-choice row come from its "Answer format: a/b/c" line, or from "Answer Choices: (A) ... (E)".
- GSM8K: {"question", "answer"}, the final answer after "#### ".
- Social IQa as released: {"context", "question", "answerA", "answerB", "answerC"}, labels 1-3 in
  NAME-labels.lst next to NAME.jsonl (or a "label" column), turned into LLM-Adapters rows.
Any row may name its task in a "task" field; otherwise the task is the file's (see `_default_task`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from ..answers import completion_for
from ..config import DataConfig
from ..errors import ConfigError, DataError
from .presets import DATA_DIR_ENV, local_folder, resize_training
from .sources import _decode_utf8, load_hub_dataset

# What to do with a row whose response is empty: fail, leave the row out, or answer with the
# response that gives the gold answer (evaluation rows, where the response is only a reference).
EmptyOutput = Literal["error", "skip", "answer"]
Fail = Callable[[str], DataError]  # builds the error for the row being read

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SPLIT_NAMES = {"train", "test", "dev", "valid", "validation", "eval"}
_ANSWER_FORMAT = "Answer format:"
_ANSWER_CHOICES = "Answer Choices:"


@dataclass
class InstructionSplit:
    prompts: list[str]                 # the user instruction, with any input folded in; no chat template
    targets: list[str]                 # the response the model is trained to produce
    answers: list[str]                 # the gold final answer: "18", "true", "answer2", "option1", "A"
    tasks: list[str]                   # the source task of each example
    options: list[list[str] | None]    # multiple choice: the candidate answers in order; None for numbers

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices) -> InstructionSplit:
        indices = [int(i) for i in indices]
        return InstructionSplit(
            prompts=[self.prompts[i] for i in indices],
            targets=[self.targets[i] for i in indices],
            answers=[self.answers[i] for i in indices],
            tasks=[self.tasks[i] for i in indices],
            options=[self.options[i] for i in indices],
        )


@dataclass
class InstructionData:
    name: str
    train: InstructionSplit
    eval: InstructionSplit

    @property
    def task_names(self) -> list[str]:
        return sorted(set(self.train.tasks) | set(self.eval.tasks))


@dataclass(frozen=True)
class InstructionPreset:
    name: str
    folder: str                              # under the data root; its presence selects the local files
    train_files: dict[str, str]              # task -> file, relative to the data root
    eval_files: dict[str, dict[str, str]]    # split -> task -> file, relative to the data root
    eval_split: str                          # default evaluation split
    hub_id: str | None = None                # None: local files only (no canonical hub copy)
    hub_subset: str | None = None


COMMONSENSE_EVAL_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
ARITHMETIC_EVAL_TASKS = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "AQuA", "mawps", "gsm8k")

INSTRUCTION_PRESETS: dict[str, InstructionPreset] = {
    "gsm8k": InstructionPreset(
        name="gsm8k", folder="gsm8k",
        train_files={"gsm8k": "gsm8k/train.jsonl"},
        eval_files={"test": {"gsm8k": "gsm8k/test.jsonl"}}, eval_split="test",
        hub_id="openai/gsm8k", hub_subset="main",
    ),
    "commonsense": InstructionPreset(
        name="commonsense", folder="commonsense",
        train_files={
            **{task: f"commonsense/{task}/train.json" for task in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")},
            # built from the original release in the same format as commonsense/social_i_qa/test.json
            "social_i_qa": "social_i_qa/train.jsonl",
        },
        eval_files={"test": {task: f"commonsense/{task}/test.json" for task in COMMONSENSE_EVAL_TASKS}},
        eval_split="test",
    ),
    "arithmetic": InstructionPreset(
        name="arithmetic", folder="arithmetic",
        train_files={"math_data": "arithmetic/math_data.json"},
        eval_files={"test": {task: f"arithmetic/{task}/test.json" for task in ARITHMETIC_EVAL_TASKS}},
        eval_split="test",
    ),
}


def load_instructions(cfg: DataConfig) -> InstructionData:
    """Load the training and evaluation splits described by `cfg`.

    Source order: `data.path` and `data.eval_path` (plain files); else the preset `data.name` from local
    files under the data root (`data.source` "local", or "auto" when root/<folder>/ exists) or from the
    Hugging Face hub; else the hub data set `data.hub_id`. `data.tasks` keeps only those tasks, then
    `data.max_train_examples` takes a fixed random subset of the training rows.
    """
    if cfg.path:
        data = _load_files(cfg)
    elif cfg.name is not None:
        data = _load_preset(cfg, _get_preset(cfg.name))
    elif cfg.hub_id:
        data = _load_hub(cfg)
    else:
        raise ConfigError("no data given: set data.name to a preset "
                          f"({', '.join(INSTRUCTION_PRESETS)}), or data.path and data.eval_path, or data.hub_id")
    return resize_training(data, cfg)


def _get_preset(name: str) -> InstructionPreset:
    if name not in INSTRUCTION_PRESETS:
        raise ConfigError(f"config key 'data.name': unknown instruction data set '{name}' "
                          f"(presets: {', '.join(INSTRUCTION_PRESETS)}; or set data.name = \"none\" and give data.path)")
    return INSTRUCTION_PRESETS[name]


# ---------------------------------------------------------------- sources

def _load_preset(cfg: DataConfig, preset: InstructionPreset) -> InstructionData:
    eval_split = cfg.eval_split or preset.eval_split
    if eval_split not in preset.eval_files:
        raise ConfigError(f"config key 'data.eval_split': preset '{preset.name}' has no split '{eval_split}' "
                          f"(available: {', '.join(preset.eval_files)})")
    train_files, eval_files = _preset_files(preset, eval_split, cfg.tasks)
    folder = local_folder(cfg, preset.folder, ConfigError)
    if folder is not None:
        root = folder.parent
        # rows without a response (3 in arithmetic/math_data.json) teach nothing and are left out
        train = _concat([_read_preset_file(root, file, task, "skip") for task, file in train_files.items()])
        # held-out training rows replace the evaluation split (resize_training), which is then never read
        evaluation = train if cfg.holdout_fraction is not None else _concat(
            [_read_preset_file(root, file, task, "answer") for task, file in eval_files.items()])
    else:
        if preset.hub_id is None:
            raise DataError(f"preset '{preset.name}' is read from local files only (no Hugging Face hub copy): "
                            f"set data.root or {DATA_DIR_ENV} to the folder that holds '{preset.folder}/'")
        hub_id = cfg.hub_id or preset.hub_id
        train = _parse_rows(*_hub_rows(hub_id, preset.hub_subset, "train"), preset.name, "skip")
        evaluation = train if cfg.holdout_fraction is not None else _parse_rows(
            *_hub_rows(hub_id, preset.hub_subset, eval_split), preset.name, "answer")
    return InstructionData(preset.name, train, evaluation)


def _preset_files(preset: InstructionPreset, eval_split: str, tasks: list[str] | None
                  ) -> tuple[dict[str, str], dict[str, str]]:
    train_files, eval_files = preset.train_files, preset.eval_files[eval_split]
    if tasks is None:
        return train_files, eval_files
    _check_task_names(tasks, sorted({*train_files, *eval_files}))
    chosen_train = {task: file for task, file in train_files.items() if task in tasks}
    chosen_eval = {task: file for task, file in eval_files.items() if task in tasks}
    _check_selection(tasks, list(chosen_train), list(chosen_eval), list(train_files), list(eval_files))
    return chosen_train, chosen_eval


def _read_preset_file(root: Path, relative: str, task: str, empty_output: EmptyOutput) -> InstructionSplit:
    path = root / relative
    if not path.is_file():
        raise DataError(f"{path} not found: set data.root or {DATA_DIR_ENV} to the folder that holds '{relative}'")
    return _read_file(path, task, empty_output)


def _load_files(cfg: DataConfig) -> InstructionData:
    if not cfg.eval_path and cfg.holdout_fraction is None:
        raise ConfigError("config key 'data.eval_path' is required with data.path (the evaluation file; or set "
                          "data.holdout_fraction to evaluate on held-out training rows)")
    train_path = Path(cfg.path)
    eval_path = Path(cfg.eval_path) if cfg.eval_path else None
    for key, path in (("data.path", train_path), ("data.eval_path", eval_path)):
        if path is not None and not path.is_file():
            raise DataError(f"config key '{key}': file not found: {path}")
    train = _read_file(train_path, _default_task(train_path), "error")
    evaluation = train if eval_path is None else _read_file(eval_path, _default_task(eval_path), "answer")
    data = InstructionData(_default_task(train_path), train, evaluation)
    return _keep_tasks(data, cfg.tasks)


def _load_hub(cfg: DataConfig) -> InstructionData:
    task = cfg.hub_id.rstrip("/").split("/")[-1]
    train = _parse_rows(*_hub_rows(cfg.hub_id, None, "train"), task, "error")
    data = InstructionData(cfg.hub_id, train, train if cfg.holdout_fraction is not None else
                           _parse_rows(*_hub_rows(cfg.hub_id, None, cfg.eval_split or "test"), task, "answer"))
    return _keep_tasks(data, cfg.tasks)


def _default_task(path: Path) -> str:
    """The file stem, or the folder name for a file named after its split (boolq/test.json -> boolq)."""
    if path.stem.lower() in _SPLIT_NAMES and path.parent.name:
        return path.parent.name
    return path.stem


def _hub_rows(hub_id: str, subset: str | None, split: str) -> tuple[list[Any], str, Callable[[int], str]]:
    dataset, source = load_hub_dataset(hub_id, subset, split)
    return dataset.to_list(), source, lambda i: f"row {i}"


# ---------------------------------------------------------------- tasks

def _keep_tasks(data: InstructionData, tasks: list[str] | None) -> InstructionData:
    if tasks is None:
        return data
    _check_task_names(tasks, data.task_names)
    train = data.train.select([i for i, task in enumerate(data.train.tasks) if task in tasks])
    evaluation = data.eval.select([i for i, task in enumerate(data.eval.tasks) if task in tasks])
    _check_selection(tasks, train.tasks, evaluation.tasks, data.train.tasks, data.eval.tasks)
    return InstructionData(data.name, train, evaluation)


def _check_task_names(tasks: list[str], known: list[str]) -> None:
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise ConfigError(f"config key 'data.tasks': unknown task {', '.join(repr(t) for t in unknown)} "
                          f"(known tasks: {', '.join(known)})")


def _check_selection(tasks: list[str], chosen_train: list[str], chosen_eval: list[str],
                     train_tasks: list[str], eval_tasks: list[str]) -> None:
    for side, chosen, available in (("training", chosen_train, train_tasks), ("evaluation", chosen_eval, eval_tasks)):
        if not chosen:
            raise ConfigError(f"config key 'data.tasks': {', '.join(tasks)} leaves no {side} data "
                              f"(tasks with {side} data: {', '.join(sorted(set(available)))})")


# ---------------------------------------------------------------- files and rows

def _read_file(path: Path, task: str, empty_output: EmptyOutput) -> InstructionSplit:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type '{suffix}' (instruction data is .json or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = _decode_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    rows, where = _jsonl_rows(path, text) if suffix == ".jsonl" else _json_rows(path, text)
    return _parse_rows(rows, str(path), where, task, empty_output, path.with_name(f"{path.stem}-labels.lst"))


def _jsonl_rows(path: Path, text: str) -> tuple[list[Any], Callable[[int], str]]:
    rows, lines = [], []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and other characters inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON: {err.msg} (column {err.colno})") from None
        lines.append(number)
    return rows, lambda i: f"line {lines[i]}"


def _json_rows(path: Path, text: str) -> tuple[list[Any], Callable[[int], str]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    return rows, lambda i: f"item {i + 1}"


def _parse_rows(rows: list[Any], source: str, where: Callable[[int], str], task: str,
                empty_output: EmptyOutput, labels_file: Path | None = None) -> InstructionSplit:
    if not rows:
        raise DataError(f"{source}: no data rows")
    prompts, targets, answers, tasks, options = [], [], [], [], []
    row_format, labels = None, None
    for i, row in enumerate(rows):
        def fail(message: str) -> DataError:
            return DataError(f"{source} {where(i)}: {message}")

        if not isinstance(row, dict):
            raise fail(f"expected a JSON object, got {type(row).__name__}")
        if row_format is None:
            row_format = _row_format(row, fail)
            if row_format == "social_iqa" and labels_file is not None and labels_file.is_file():
                labels = _read_labels(labels_file, len(rows))
        if row_format == "llm_adapters":
            prompt, target, answer, row_options = _llm_adapters_row(row, fail)
        elif row_format == "gsm8k":
            prompt, target, answer, row_options = _gsm8k_row(row, fail)
        else:
            prompt, target, answer, row_options = _social_iqa_row(
                row, labels[i] if labels is not None else row.get("label"), fail)
        row_task = _row_task(row, task, fail)
        if not target.strip():
            if empty_output == "error":
                raise fail("empty field 'output' (no response to train on)")
            if empty_output == "skip":
                continue
            target = completion_for(row_task, answer)
        prompts.append(prompt)
        targets.append(target)
        answers.append(answer)
        tasks.append(row_task)
        options.append(row_options)
    return InstructionSplit(prompts, targets, answers, tasks, options)


def _row_format(row: dict, fail: Fail) -> str:
    if "instruction" in row:
        return "llm_adapters"
    if "context" in row and "answerA" in row:
        return "social_iqa"
    if "question" in row and "answer" in row:
        return "gsm8k"
    raise fail(f"neither the LLM-Adapters format (instruction, input, output, answer) nor the GSM8K format "
               f"(question, answer); columns: {', '.join(row) or 'none'}")


def _llm_adapters_row(row: dict, fail: Fail) -> tuple[str, str, str, list[str] | None]:
    instruction = _text(row, "instruction", fail)
    given_input = _text(row, "input", fail, optional=True, allow_empty=True)
    output = _text(row, "output", fail, allow_empty=True)
    answer = _gold_answer(row, fail)
    options = _options(instruction)
    if options is None and not _NUMBER.fullmatch(answer):
        raise fail(f"answer {answer!r} is not a number, and the instruction lists no options "
                   f"('{_ANSWER_FORMAT} a/b' or '{_ANSWER_CHOICES} (A) ...')")
    if options is not None and answer not in options:
        raise fail(f"answer {answer!r} is not one of the options {'/'.join(options)}")
    prompt = f"{instruction}\n\n{given_input}" if given_input.strip() else instruction
    return prompt, output, answer, options


def _gsm8k_row(row: dict, fail: Fail) -> tuple[str, str, str, None]:
    question = _text(row, "question", fail)
    solution = _text(row, "answer", fail)
    marker = solution.rfind("#### ")
    if marker < 0:
        raise fail("field 'answer' has no final answer after '#### '")
    final = solution[marker + len("#### "):].strip().replace(",", "")
    if not _NUMBER.fullmatch(final):
        raise fail(f"final answer {final!r} after '#### ' is not a number")
    return question, solution, final, None


def _social_iqa_row(row: dict, label: Any, fail: Fail) -> tuple[str, str, str, list[str]]:
    context, question, answer_a, answer_b, answer_c = (
        _text(row, key, fail) for key in ("context", "question", "answerA", "answerB", "answerC"))
    if label is None:
        raise fail("no label: no 'label' field and no NAME-labels.lst next to the file")
    label = str(label).strip()
    if label not in ("1", "2", "3"):
        raise fail(f"label {label!r} is not 1, 2 or 3")
    instruction = (f"Please choose the correct answer to the question: {context} {question}\n\n"
                   f"Answer1: {answer_a} Answer2: {answer_b} Answer3: {answer_c}\n\n"
                   f"Answer format: answer1/answer2/answer3")
    answer = f"answer{label}"
    return instruction, f"the correct answer is {answer}", answer, ["answer1", "answer2", "answer3"]


def _read_labels(path: Path, count: int) -> list[str]:
    lines = _decode_utf8(path).split("\n")
    if lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != count:
        raise DataError(f"{path}: {len(lines)} labels for the {count} rows of the data file")
    labels = [line.strip() for line in lines]
    for number, label in enumerate(labels, start=1):
        if label not in ("1", "2", "3"):
            raise DataError(f"{path} line {number}: label {label!r} is not 1, 2 or 3")
    return labels


def _text(row: dict, key: str, fail: Fail, *, optional: bool = False, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if optional:
            return ""
        raise fail(f"missing field '{key}'")
    if not isinstance(value, str):
        raise fail(f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise fail(f"empty field '{key}'")
    return value


def _gold_answer(row: dict, fail: Fail) -> str:
    value = row.get("answer")
    if value is None:
        raise fail("missing field 'answer'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise fail(f"field 'answer' must be a string or a number, got {value!r}")
    answer = str(value).strip()
    if not answer:
        raise fail("empty field 'answer'")
    without_commas = answer.replace(",", "")
    return without_commas if _NUMBER.fullmatch(without_commas) else answer


def _options(instruction: str) -> list[str] | None:
    """The candidate answers listed in an instruction, None when it lists none."""
    if _ANSWER_FORMAT in instruction:
        line = instruction.rsplit(_ANSWER_FORMAT, 1)[1].strip().split("\n", 1)[0]
        return [option.strip() for option in line.split("/") if option.strip()] or None
    if _ANSWER_CHOICES in instruction:
        letters = re.findall(r"\(([A-E])\)", instruction.rsplit(_ANSWER_CHOICES, 1)[1])
        return list(dict.fromkeys(letters)) or None
    return None


def _row_task(row: dict, task: str, fail: Fail) -> str:
    value = row.get("task")
    if value is None:
        return task
    if not isinstance(value, str) or not value.strip():
        raise fail(f"field 'task' must be a non-empty string, got {value!r}")
    return value


def _concat(splits: list[InstructionSplit]) -> InstructionSplit:
    return InstructionSplit(
        prompts=[prompt for split in splits for prompt in split.prompts],
        targets=[target for split in splits for target in split.targets],
        answers=[answer for split in splits for answer in split.answers],
        tasks=[task for split in splits for task in split.tasks],
        options=[options for split in splits for options in split.options],
    )
