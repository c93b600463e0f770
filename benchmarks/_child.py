"""Run one benchmark measurement in a fresh Python process and read back its result.

Timing and peak RSS are only comparable when each method gets its own process (no
warm caches, no memory left over from the previous method), so the harnesses re-run
themselves with a child flag; the child prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(argv: list[str], env: dict[str, str], name: str) -> dict:
    """``python <argv>`` in a subprocess; its last ``RESULT`` line as a dict, or exit."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT ") :])
