"""Training progress on the console: one status line that updates in place, one line per epoch.

:func:`kdray.train.fit` emits small event dicts (``kind`` ``"step"`` or ``"epoch"``); a
:class:`ConsoleProgress` renders them. Under Ray the rank-0 worker forwards the same events to
the driver (kdray/orchestration/ray_train.py), which renders them with the same class, so a
stage on Ray reads like one in this process. The status line is drawn only on a terminal; a
log file gets the per-epoch lines alone.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable

# The val metrics an epoch line shows, when the stage reports them (COCO/CrowdPose, MPII).
SHOWN = ("val_AP", "val_Mean", "val_err_occluded")


def clock(seconds: float | None) -> str:
    """``75`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class ConsoleProgress:
    """Renders fit's events for one stage.

    ``label``: the stage's name; ``index``/``total``: its place in a pipeline (0 = alone);
    ``rest``: given this stage's remaining seconds, the pipeline's remaining seconds after it
    (:meth:`kdray.orchestration.pipeline.Pipeline.progress` supplies it).
    """

    def __init__(self, label: str = "", index: int = 0, total: int = 0,
                 rest: Callable[[float], float] | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.head = f"stage {index}/{total} {label}" if total else label
        self.rest = rest
        self.tty = (getattr(self.stream, "isatty", lambda: False)()
                    and os.environ.get("KDRAY_PROGRESS", "1") != "0")
        self._t0: float | None = None
        self._first: tuple[int, int] | None = None   # (epoch, step) of the first event seen
        self._drawn = False

    def __call__(self, event: dict) -> None:
        if event.get("kind") == "step":
            self._status(event)
        elif event.get("kind") == "epoch":
            self._epoch(event)

    def eta(self, event: dict) -> float | None:
        """Seconds left in this stage, from the steps done since the first event we saw (a
        resumed stage starts counting at its first step)."""
        now = time.monotonic()
        epoch, step, steps, epochs = (int(event[k]) for k in ("epoch", "step", "steps", "epochs"))
        if self._t0 is None:
            self._t0, self._first = now, (epoch, step)
            return None
        e0, s0 = self._first
        done = (epoch - e0) * steps + step - s0
        left = (epochs - epoch) * steps + steps - step - 1
        return (now - self._t0) / done * left if done > 0 else None

    def _status(self, ev: dict) -> None:
        eta = self.eta(ev)
        if not self.tty:
            return
        pct = 100.0 * (int(ev["step"]) + 1) / max(int(ev["steps"]), 1)
        text = (f"{self.head} | epoch {int(ev['epoch'])}/{int(ev['epochs'])} {pct:3.0f}% | "
                f"loss {ev['loss']:.4f} | {ev['ips']:.0f} img/s | ETA {clock(eta)}")
        if self.rest is not None and eta is not None:
            text += f" (pipeline ~{clock(eta + self.rest(eta))})"
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r" + text[:width] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def _epoch(self, ev: dict) -> None:
        m = ev["metrics"]
        parts = [f"{self.head} | epoch {int(m['epoch'])}/{int(ev['epochs'])}",
                 f"loss {m.get('loss', float('nan')):.4g}",
                 f"{m.get('throughput', 0.0):.0f} img/s", f"{m.get('epoch_seconds', 0.0):.0f} s"]
        parts += [f"{k.removeprefix('val_')} {m[k]:.2f}" for k in SHOWN
                  if isinstance(m.get(k), float)]
        self.clear()
        print("[kdray] " + " | ".join(parts), file=self.stream, flush=True)

    def clear(self) -> None:
        """Remove the status line (before a permanent line, and when the stage ends)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
