"""``ddpm runs``: the runs under a folder, with their state, step and best checkpoint."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ddpm.cli.common import HelpFormatter, say


def register(sub: Any) -> None:
    p = sub.add_parser("runs", help="list the runs under a folder: state, step, best checkpoint",
                       formatter_class=HelpFormatter,
                       description="Every run folder at or below FOLDER: running (its lock is held), finished, "
                                   "stopped by a signal or the time limit (resume it with --resume auto), "
                                   "interrupted (killed, crashed or blown up; its newest good checkpoint resumes), "
                                   "or empty; its newest good checkpoint's step of the steps asked for, and the best "
                                   "checkpoint of its evaluation while training.")
    p.add_argument("folder", type=Path, nargs="?", default=Path("runs"), help="where to look")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm.errors import UserError
    from ddpm.train.run_folder import find_runs, summarize_run

    if not args.folder.is_dir():
        raise UserError(f"{str(args.folder)!r} is not a folder")
    summaries = [summarize_run(folder) for folder in find_runs(args.folder)]
    if args.json:
        for s in summaries:
            say(json.dumps({"folder": str(s.folder), "state": s.state, "step": s.step, "steps": s.steps,
                            "best": s.best, "updated": s.updated}))
        return 0
    if not summaries:
        say(f"no runs under {args.folder}")
        return 0
    rows = [("run", "state", "step", "best", "updated")]
    for s in summaries:
        step = "-" if s.step is None else f"{s.step}/{s.steps if s.steps is not None else '?'}"
        best = "-" if s.best is None else f"{s.best['metric']} {s.best['value']:.4g} at step {s.best['step']}"
        updated = "-" if s.updated is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(s.updated))
        rows.append((str(s.folder), s.state, step, best, updated))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        say("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
