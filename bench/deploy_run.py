"""Item 6: deploy timings, measured by bench/deploy.py (written with the deploy kit) when it is there."""

from __future__ import annotations

import importlib

from bench.context import Context
from bench.report import Result


def run(ctx: Context) -> Result:
    try:
        deploy = importlib.import_module("bench.deploy")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.deploy":
            raise
        return Result("deploy", skipped="bench/deploy.py is not there yet (the deploy issue writes it)")
    return deploy.run(ctx)
