"""Benchmark sweep: tau, tokens/s, the time split of a round, and the peers (HF transformers,
dflash), every output checked against greedy AR. Same as `python -m jetspec_jax.bench`; see its
--help. Example (a trained head, the five prompt sets, 10 prompts each):

    python scripts/bench.py --draft HEAD_DIR --num-prompts 10 --max-new-tokens 128
"""

import sys

from jetspec_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
