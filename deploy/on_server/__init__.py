"""Code that runs ON the servers: app_helper.py (the release's Django), root_helper.py and watchdog.py (root's
standard library).

None of them can import the kit there: `script` makes each one self-contained text for `python -c`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The kit modules a helper may import: each such import line is replaced by the module's text.
INLINED = {
    "deploy.on_server.common": HERE / "common.py",
    "deploy.on_server.senders": HERE / "senders.py",
    "deploy.app": HERE.parent / "app.py",
}


@cache
def script(name: str) -> str:
    """deploy/on_server/NAME.py as one self-contained script, each `from deploy.X import ...` replaced by X's text."""
    lines = []
    for line in (HERE / f"{name}.py").read_text().splitlines(keepends=True):
        if not line.startswith(("from deploy", "import deploy")):
            lines.append(line)
            continue
        module = line.split()[1]
        if module not in INLINED:
            raise ValueError(f"{name}.py imports {module}, which is not on the server; add it to INLINED")
        text = INLINED[module].read_text()
        if any(line.startswith("from __future__") for line in text.splitlines()):
            raise ValueError(f"{module} has a `from __future__` import, which must come first in {name}.py's script")
        lines.append(text)
    return "".join(lines)
