"""What every benchmark of one run shares: the seeded database, the environment, a log folder."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import fixtures
from bench.services import BenchDatabase, bench_env, flush_redis, migrated, setup_django

APPROVED_REQUESTS = 1000


@dataclass
class Context:
    quick: bool = False
    database: BenchDatabase = field(default_factory=lambda: BenchDatabase(name=_db_name()))
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prayer-room-bench-")))
    env: dict[str, str] = field(default_factory=dict)

    def open(self) -> Context:
        """Create and migrate the database, seed the public requests, set Django up in this process."""
        self.database.create()
        try:
            self.env = bench_env(self.database)
            migrated(self.database, self.env)
            flush_redis()
            setup_django(self.env)
            fixtures.approved_requests(APPROVED_REQUESTS)
        except BaseException:
            self.database.drop()
            raise
        return self

    def close(self) -> None:
        from django.db import connections

        connections.close_all()
        self.database.drop()

    def logs(self, *parts: str) -> Path:
        path = self.log_dir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


def _db_name() -> str:
    import secrets

    return f"prayer_room_bench_{secrets.token_hex(4)}"
