"""What every benchmark records about the machine it ran on, and how it writes its results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM, RssShmem, ...); OSError where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def write_result(path: Path | None, result: dict) -> None:
    """The raw results as indented JSON at `path` (when given)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def child_result(script: Path, args: list[str], *, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run `script args` in a fresh Python process; its last `RESULT {json}` line of stdout."""
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False, cwd=cwd, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{script} {args[:2]} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
