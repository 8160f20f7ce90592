"""Machine-readable run records: one JSON-lines file per experiment output folder.

Each line is a JSON object with a ``type``:

- ``"session"``: one per command invocation (argv, versions, machine, time);
- ``"start"``: a run begins (``run`` key, full ``config``, versions);
- ``"eval"``: one evaluation row of run ``run`` (step, train_time, eval_time, metrics, trace);
- ``"done"``: the run finished (``final`` row, total seconds); resume skips runs that have one;
- ``"tune"``: a tuning result (optimizer, grid, per-candidate scores, winner).

Rows of a run that was interrupted before its ``done`` line are ignored by :meth:`Records.rows`
and the run is redone from scratch on the next invocation (its newest ``start`` wins).

A crash (or a full disk) can cut the last line mid-write. Opening the file repairs that before
anything is appended: a file that does not end with a newline gets one, so the cut line stays a
line of its own (kept for inspection) and the next record starts on a fresh line instead of being
glued onto it and lost. :meth:`Records.read` skips lines that are not valid JSON objects and lists
their line numbers in :attr:`Records.corrupt_lines`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["Records", "versions"]


def versions() -> dict[str, str]:
    """Versions of Python and the main packages, and a description of the machine."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("gaussnewton", "jax", "jaxlib", "optax", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            pass
    try:
        import jax

        out["device"] = str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001
        pass
    out["cpu_count"] = str(os.cpu_count())
    out["cpu"] = cpu_model()
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN / inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Records:
    """Append-only JSON-lines record at ``folder / "records.jsonl"``.

    Attributes:
        repaired: True when opening found a cut last line (no trailing newline) and ended it.
        corrupt_lines: 1-based numbers of the lines the last :meth:`read` skipped (not JSON).

    Example::

        recs = Records("results/demo")
        recs.append({"type": "session", "argv": []})
        assert recs.read()[-1]["type"] == "session"
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "records.jsonl"
        self.corrupt_lines: list[int] = []
        self.repaired = self._end_cut_line()

    def _end_cut_line(self) -> bool:
        """Terminate a last line that a crash left without its newline (see the module doc)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return False
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def append(self, obj: dict[str, Any]) -> None:
        """Write one line and flush it to disk (so an interrupted run keeps what it did)."""
        line = json.dumps(_clean({**obj, "time": time.time()}), sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records, oldest first; lines that are not JSON objects (a line cut by a crash) are
        skipped and their numbers kept in :attr:`corrupt_lines`."""
        self.corrupt_lines = []
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    out.append(obj)
                else:
                    self.corrupt_lines.append(number)
        return out

    def done(self) -> dict[str, dict[str, Any]]:
        """``{run_key: done_record}`` of finished runs."""
        return {r["run"]: r for r in self.read() if r.get("type") == "done"}

    def rows(self, keys: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Evaluation rows of FINISHED runs (the attempt that finished), by run key."""
        recs = self.read()
        finished = {r["run"]: r.get("attempt") for r in recs if r.get("type") == "done"}
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in recs:
            k = r.get("run")
            if r.get("type") != "eval" or k not in finished or (keys is not None and k not in keys):
                continue
            if r.get("attempt") == finished[k]:
                out[k].append(r)
        return dict(out)

    def configs(self) -> dict[str, dict[str, Any]]:
        """``{run_key: config}`` from the start records."""
        return {r["run"]: r["config"] for r in self.read() if r.get("type") == "start"}

    def tunes(self) -> list[dict[str, Any]]:
        """All tuning records, oldest first."""
        return [r for r in self.read() if r.get("type") == "tune"]
