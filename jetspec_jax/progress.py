"""Progress bars of long jobs (data regeneration, training): one policy for every bar.

    bar = progress_bar(total=500, desc="training", unit="step", initial=0, enabled=True)

On a terminal the bar refreshes every second; when stderr is a log file it writes a line every
30 s, so a background run's log stays readable and still shows progress.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(*, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                mininterval=1 if sys.stderr.isatty() else 30)
