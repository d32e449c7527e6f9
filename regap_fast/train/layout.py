"""Where a training run keeps its files, readable without torch (so that checks before a run are quick).

    OUT/checkpoints/step-00000500/{trainable.safetensors, train_state.pt, config.json}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, STATE, CONFIG = "trainable.safetensors", "train_state.pt", "config.json"


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None
