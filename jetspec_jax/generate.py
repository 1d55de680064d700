"""Entry point of `python -m jetspec_jax.generate` (the library function is `jetspec_jax.generate`).

The command line lives in `jetspec_jax.cli`; this module only runs it, so that importing the
package never shadows the `generate` function with this module.
"""

import os
import sys

from jetspec_jax.cli import main as run_cli


def main() -> int:
    """Run the command line, then end the process at once: its output is written and flushed by
    then, and the interpreter's teardown (freeing the compiled programs and the mapped weights,
    JAX's exit hooks) took ~0.5 s of a 9 s answer on a 2-core machine. Multi-process runs exit
    normally (jax.distributed shuts down in an exit hook)."""
    code = run_cli()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`... | head`): nothing more can reach it
            pass
    jax = sys.modules.get("jax")
    if jax is None or jax.process_count() == 1:
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
