"""Where benchmark results go: stdout and a JSON file always, ``bench/RESULTS.md`` only when asked (``--record``).

Running a benchmark never edits a committed file on its own; ``--record`` appends one dated section, naming the
machine and the command, to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS_MD = Path(__file__).resolve().with_name("RESULTS.md")


def machine() -> str:
    """The processor and core count, e.g. ``x86_64, 2 cores``."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def command_line(script: str, argv: list[str] | None) -> str:
    """How a script was called, for the record (``--record`` itself left out)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{script}.py", *[a for a in args if a != "--record"]])


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically: a reader sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=1))


def record(title: str, command: str, body: str, where: str | None = None) -> Path:
    """Append a section ``## title (date, machine)`` with the command and ``body`` to ``bench/RESULTS.md``."""
    stamp = datetime.date.today().isoformat()
    section = f"\n## {title} ({stamp}, {where or machine()})\n\n`{command}`\n\n{body.rstrip()}\n"
    with open(RESULTS_MD, "a") as f:
        f.write(section)
    print(f"recorded in {RESULTS_MD}")
    return RESULTS_MD
