"""Pieces of the benchmark harness `python -m jetspec_jax.bench` (the command line is bench.py).

    sources   prompt sets (chat template applied) or a JSONL file of prompts -> token ids
    measure   compile counter, the timed fused run (`start` + `decode`), machine description
    split     the instrumented pass: each stage of a round jitted and timed on its own
    peers     HF transformers greedy decoding and the `dflash` reference loop, on the same ids
    sweep     the measuring loop: every engine and the split on one prompt before the next
    report    aggregates, the speed-up matrix, and the JSON / markdown / PNG outputs
"""
