"""Named pause points, so tests can SIGKILL the engine at an exact moment instead of racing it.

When the environment names a point in ENGINE_PAUSE_AT, the process reaching that point
creates the file ENGINE_PAUSE_FILE and sleeps until it is killed. Unset (always, outside
tests) the call costs one dictionary look-up.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str) -> None:
    if os.environ.get("ENGINE_PAUSE_AT") != name:
        return
    marker = os.environ.get("ENGINE_PAUSE_FILE")
    if marker:
        Path(marker).write_text(f"{os.getpid()} {name}\n", encoding="utf-8")
    while True:
        time.sleep(3600)
