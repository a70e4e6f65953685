"""A rendered nginx site checked by the real nginx (`nginx -t`), without a server."""

from __future__ import annotations

import subprocess
from pathlib import Path


def nginx_test(directory: Path, site: str) -> subprocess.CompletedProcess:
    """`nginx -t` of `site` (a rendered site's text) included in a minimal nginx.conf, its prefix `directory`.
    server_tokens is off in the http block, as Debian 13's nginx.conf has it: the site must not repeat it there."""
    (directory / "logs").mkdir(exist_ok=True)
    (directory / "site.conf").write_text(site)
    (directory / "nginx.conf").write_text(
        f"pid {directory}/nginx.pid; error_log {directory}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; server_tokens off; include {directory}/site.conf; }}\n"
    )
    return subprocess.run(
        ["nginx", "-t", "-p", str(directory), "-c", str(directory / "nginx.conf")], capture_output=True, text=True
    )
