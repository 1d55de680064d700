"""Training-data regeneration: the target answers the training prompts itself.

    prompts = chat_prompts(model.tokenizer, ["gsm8k", "mbpp"])        # [(key, ids), ...]
    regenerate(model, prompts, "runs/data/smollm2-135m", batch_size=16, max_new_tokens=512)

Why: a head trained on the target's own outputs learns what the target will say; trained on
corpus text it learns something else (DESIGN.md section 3: GSM8K tau 8.62 vs 3.65 in the paper).

Prompts are interleaved across sets (`_balanced_order`) and decoded with continuous batching
(`batcher.py`; AR: no draft head yet): a row that finishes is refilled with the next prompt, so one
long answer does not hold a whole batch. Every `shard_size` (64) finished answers become one shard
(see `shards.py`). A restart skips every prompt whose key is already stored, so an interrupted run
resumes where it stopped; an interrupt (Ctrl-C, SIGTERM) still writes the finished answers, losing
only the rows in flight. Sampling, when used, draws from a per-prompt seed, so the result does not
depend on how prompts were batched.
"""

from __future__ import annotations

import time
import zlib

from jetspec_jax.batcher import generate_continuous
from jetspec_jax.errors import UserError
from jetspec_jax.progress import progress_bar
from jetspec_jax.prompts import check_training_sets, load_prompts
from jetspec_jax.step import DecodeConfig
from jetspec_jax.train.shards import done_keys, exclusive, prompt_set, shard_paths, write_manifest, write_shard


def chat_prompts(tokenizer, set_names, limit: int | None = None) -> list:
    """[(key "<set>/<index>", prompt ids under the chat template)] for the training sets
    (the first `limit` prompts of each set if given)."""
    check_training_sets(set_names)
    if tokenizer is None:
        raise UserError("the target has no tokenizer; cannot apply its chat template")
    out = []
    for name in set_names:
        for i, text in enumerate(load_prompts(name)[:limit]):
            out.append((f"{name}/{i}", tokenizer.apply_chat_template([{"role": "user", "content": text}])))
    return out


def _row_seed(seed: int, key: str) -> int:
    return (zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def _balanced_order(todo, prompts, done) -> list:
    """The prompts to answer, so that the stored data stays a balanced mix of the prompt sets
    however early it is cut: the set furthest behind (by the fraction of its prompts stored)
    goes first; within a set, shortest first (similar lengths share a prefill)."""
    total, stored = {}, {}
    for key, _ in prompts:
        s = prompt_set(key)
        total[s] = total.get(s, 0) + 1
        stored[s] = stored.get(s, 0) + (key in done)
    rank, out = {}, []
    for key, ids in sorted(todo, key=lambda p: (len(p[1]), p[0])):
        s = prompt_set(key)
        rank[s] = rank.get(s, -1) + 1
        out.append(((stored[s] + rank[s]) / total[s], len(ids), key, ids))
    return [(key, ids) for _, _, key, ids in sorted(out)]


def regenerate(model, prompts, out_dir, *, batch_size: int, max_new_tokens: int, temperature: float = 0.0,
               seed: int = 0, manifest: dict | None = None, progress: bool = True, shard_size: int = 64) -> int:
    """Answer every prompt not yet stored in `out_dir`; returns how many were answered now.

    model: has `.config` (ModelConfig), `.params`, `.eos_ids` (a `LoadedModel`).
    prompts: [(key, ids)]. manifest: settings recorded (and checked on restart) beside the data.
    """
    with exclusive(out_dir, "regenerating data"):
        return _regenerate(model, prompts, out_dir, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, manifest=manifest, progress=progress,
                           shard_size=shard_size)


def _regenerate(model, prompts, out_dir, *, batch_size, max_new_tokens, temperature, seed, manifest, progress,
                shard_size) -> int:
    write_manifest(out_dir, {**(manifest or {}), "max_new_tokens": max_new_tokens,
                             "temperature": temperature, "seed": seed,
                             "vocab_size": model.config.vocab_size})
    done = done_keys(out_dir)
    todo = _balanced_order([p for p in prompts if p[0] not in done], prompts, done)
    if not todo:
        return 0
    config = DecodeConfig(target=model.config, sample=temperature > 0)
    next_shard = max((int(p.stem.split("-")[1]) + 1 for p in shard_paths(out_dir)), default=0)
    bar = progress_bar(total=len(prompts), initial=len(prompts) - len(todo), desc="regenerating", unit="seq",
                       enabled=progress)
    new_tokens, start, pending = 0, time.perf_counter(), []

    def flush():
        nonlocal next_shard
        (keys, ids), gens = zip(*[todo[i] for i, _ in pending]), [g for _, g in pending]
        write_shard(out_dir, next_shard, [list(p) + g.ids for p, g in zip(ids, gens)], [len(p) for p in ids],
                    list(keys), [g.stopped for g in gens], model.config.vocab_size)
        next_shard += 1
        pending.clear()

    finished = generate_continuous({"target": model.params}, [ids for _, ids in todo], config,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                                   seeds=[_row_seed(seed, k) for k, _ in todo], stop_ids=model.eos_ids)
    try:
        for index, gen in finished:
            pending.append((index, gen))
            new_tokens += len(gen.ids)
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
            if len(pending) >= shard_size:
                flush()
    finally:  # an interrupted run keeps every finished answer; only rows in flight are lost
        if pending:
            flush()
        bar.close()
    return len(todo)
