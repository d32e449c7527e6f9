"""Per-step metrics: JSON Lines (always), TensorBoard (when installed), and a PNG plot at the end."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops the lines of the steps
    that will be run again, so the file reads like one uninterrupted run."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, resume_step: Optional[int] = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._fh = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:
                log.info("TensorBoard is not installed; metrics go to %s only", self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


def plot_runs(runs: dict[str, str | Path], png: str | Path, title: str = "") -> Optional[Path]:
    """Caption loss and gap over steps, one line per run (train per step, held-out as markers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, path) in enumerate(runs.items()):
        colour = f"C{i}"
        rows = read_jsonl(path)
        for ax, key in zip(axes, ("lm_loss", "gap")):
            train = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            held = [(r["step"], r["eval_" + key]) for r in rows if r.get("eval_" + key) is not None]
            if train:
                ax.plot(*zip(*train), color=colour, alpha=0.45, lw=1, label=f"{label} (train)")
            if held:
                ax.plot(*zip(*held), "o-", color=colour, ms=4, label=f"{label} (held-out)")
    axes[0].set(title="caption loss", xlabel="step", ylabel="cross entropy (nats/token)")
    axes[1].set(title="modality gap ||mean image - mean caption||", xlabel="step", ylabel="L2 distance")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
