"""RELIABILITY.md from the fault suite's results:

    TENSORPAR_FAULT_RESULTS=/tmp/faults.jsonl .venv/bin/python -m pytest tests/faults
    .venv/bin/python tests/faults/report.py /tmp/faults.jsonl > RELIABILITY.md
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date

HEAD = """# Reliability

What a user sees when something breaks: one row per fault, command and layout, written by
`tests/faults/report.py` from a run of the fault suite (`tests/faults/`, part of `make test`). Each
case injects the fault into the real command, asserts the outcome and its bound, and records it
("seconds": from the fault to the command's exit, or, where it serves or trains on, the longest
pause of a stream or the time to the end of the resumed run):

    TENSORPAR_FAULT_RESULTS=/tmp/faults.jsonl .venv/bin/python -m pytest tests/faults
    .venv/bin/python tests/faults/report.py /tmp/faults.jsonl > RELIABILITY.md

"""


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = [HEAD, f"Run on {date.today().isoformat()}, {platform.machine()}, Python {platform.python_version()}; "
                 f"{len(rows)} cases.\n",
           "| fault | command | layout | what the user sees | seconds | lost |",
           "|---|---|---|---|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["command"], r["fault"], r["layout"])):
        sees = r["sees"].replace("|", "\\|")
        out.append(f"| {r['fault']} | `{r['command']}` | {r['layout']} | `{sees}` | {r['seconds']} | {r['lost']} |")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
