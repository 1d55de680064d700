"""Entry point of `python -m jetspec_jax.generate` (the library function is `jetspec_jax.generate`).

The command line lives in `jetspec_jax.cli`; this module only runs it, so that importing the
package never shadows the `generate` function with this module.
"""

import sys

from jetspec_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
