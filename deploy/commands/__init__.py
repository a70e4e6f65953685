"""Pure builders of the command lines the kit runs on servers: plain data in (config, layout, arguments), a shell
command string or an argv list out, so what a deploy runs can be printed and tested without SSH."""

from __future__ import annotations

import shlex


def sh(*words: object) -> str:
    """One shell command from words, each quoted."""
    return shlex.join(str(word) for word in words)
