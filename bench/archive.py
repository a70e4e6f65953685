"""The encrypted off-site archive on a ~1 GB database, each figure beside a baseline measured in the same run.

A fresh Debian 13 container (systemd-nspawn, as tests/deploy/test_archive_e2e.py boots) is provisioned with
archiving to the tests' S3 API (moto behind an nginx TLS front, tests/support/s3.py) and deployed with the real
`fab`; a table of the app's role is filled to about 1 GB (0.1 GB with --quick). Then, in this order:

- the baseline dump, `fab backup` (pg_dump -Fc of the same data, what the daily timer runs), then a full backup
  into the archive through its unit (what the weekly timer runs): full backup / pg_dump;
- the API's write throughput (threads POSTing new requests through nginx, rate limits off) in rounds with
  archiving on and off alternating ABBA, each round longer than archive_timeout so that an "on" round pushes WAL;
  "off" empties archive_command (a reload: the WAL written is the same, nothing is pushed), and the WAL it held
  back is pushed before the next round starts: throughput on / off, the median over back-to-back pairs;
- `fab restore --to-time` (a point before a delete), `fab restore --latest` and, as their baseline, `fab restore`
  of the dump taken above: each whole command (which dumps the database it replaces first, stops and restarts the
  programs and verifies) and the restore step alone.

Not a test: run with `python -m bench.archive [--quick]` or `invoke bench --only archive` (root, systemd-nspawn,
nginx, moto: what the archive e2e needs). Results in bench/results/archive.json.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.report import Result, Row, paired, table, write
from bench.stats import interleaved
from tests.support import s3
from tests.support.database import archive_now, sql
from tests.support.nspawn import Container, missing_tools, operator_env

REPO = Path(__file__).resolve().parents[1]
FAB = Path(sys.executable).with_name("fab")
PREFIX = "bench-archive"
LOCATION = "bench-archive"
ARCHIVE_TIMEOUT_S = 60


class Operator:
    """The operator's checkout (deploy.toml archiving to the bucket, rate limits off) and `fab` against the server."""

    def __init__(self, directory: Path, server: Container, s3_server: s3.S3Server):
        self.directory, self.server = directory, server
        shutil.copy(s3_server.ca, directory / "s3-ca.pem")
        (directory / "deploy.toml").write_text(
            "[defaults]\n"
            f'backup_repository = "s3://{s3_server.bucket}/{PREFIX}"\n'
            f'backup_s3_endpoint = "{s3_server.endpoint}:{s3_server.port}"\n'
            'backup_s3_uri_style = "path"\n'
            'backup_s3_ca_bundle = "s3-ca.pem"\n'
            "write_rate_per_minute = 0\n"
        )
        self.env = {
            **{k: v for k, v in operator_env(directory / "home", server).items() if not k.startswith("BACKUP_")},
            "BACKUP_S3_KEY": s3.S3Server.key,
            "BACKUP_S3_KEY_SECRET": s3.S3Server.key_secret,
        }

    def fab(self, *args: str) -> tuple[float, str]:
        """Wall seconds and output of one `fab` command, which must succeed."""
        host = ["-H", f"root@{self.server.address}", "-i", str(self.server.key)]
        command = [str(FAB), *host, *args, "--config", str(self.directory / "deploy.toml")]
        started = time.monotonic()
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=self.env, timeout=3600)
        seconds = time.monotonic() - started
        if run.returncode != 0:
            raise RuntimeError(f"fab {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}")
        return seconds, run.stdout


def set_archiving(server: Container, on: bool) -> None:
    """Archiving on (the provisioned archive_command) or off (an empty one: PostgreSQL keeps the WAL for later)."""
    change = "ALTER SYSTEM RESET archive_command" if on else "ALTER SYSTEM SET archive_command = ''"
    sql(server, change)
    sql(server, "SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while (sql(server, "SHOW archive_command") != "") != on:
        if time.monotonic() > deadline:
            raise RuntimeError(f"archive_command did not change ({'on' if on else 'off'}) in 30 s")
        time.sleep(0.2)


def fill(server: Container, rows: int) -> None:
    """A table of the app's role (so its pg_dump reads it) of `rows` rows of 256 hex characters each, about as
    compressible as text (md5 digests, about 2:1)."""
    sql(server, "CREATE TABLE bench_filler (id bigint PRIMARY KEY, payload text NOT NULL)")
    sql(
        server,
        "DO $$ BEGIN EXECUTE format('ALTER TABLE bench_filler OWNER TO %I', (SELECT tableowner FROM pg_tables "
        "WHERE tablename = 'django_migrations')); END $$",
    )
    step = 500_000
    for start in range(1, rows + 1, step):
        end = min(rows, start + step - 1)
        payload = " || ".join(f"md5((i * 8 + {k})::text)" for k in range(8))
        sql(server, f"INSERT INTO bench_filler SELECT i, {payload} FROM generate_series({start}, {end}) i")
    sql(server, "VACUUM ANALYZE bench_filler")


def post_for(address: str, seconds: float, threads: int = 4) -> tuple[int, int, float]:
    """POST new requests through nginx from `threads` kept-alive connections for `seconds`: (created, failed,
    seconds taken)."""
    body = json.dumps({"type": "prayer", "content": "a request sent while measuring", "location": LOCATION})
    counts = {"created": 0, "failed": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        created = failed = 0
        conn = http.client.HTTPConnection(address, 80, timeout=30)
        while time.monotonic() < stop:
            try:
                conn.request("POST", "/api/requests/", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                created += response.status == 201
                failed += response.status != 201
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(address, 80, timeout=30)
        conn.close()
        with lock:
            counts["created"] += created
            counts["failed"] += failed

    started = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return counts["created"], counts["failed"], time.monotonic() - started


def restored_seconds(output: str) -> float:
    """The restore step's own seconds, as `fab restore` prints them ("restored in 12.3 s ...")."""
    found = re.search(r"restored in ([\d.]+) s", output)
    if not found:
        raise RuntimeError(f"no 'restored in N s' in:\n{output[-2000:]}")
    return float(found.group(1))


def measure(workdir: Path, quick: bool) -> Result:
    gigabytes = 0.1 if quick else 1.0
    rows = int(gigabytes * 1e9 / 330)  # a row and its index entry take about 330 bytes
    round_s = 20 if quick else ARCHIVE_TIMEOUT_S + 5
    pairs = 1 if quick else 3
    raw: dict = {"rounds": []}
    (workdir / "s3").mkdir()
    s3_server = s3.S3Server(workdir / "s3").start()
    server = None
    try:
        (workdir / "vps").mkdir()
        server = s3.boot_server(workdir / "vps", s3_server)
        operator_dir = workdir / "operator"
        operator_dir.mkdir()
        op = Operator(operator_dir, server, s3_server)
        raw["provision_s"], _ = op.fab("provision")
        raw["deploy_s"], _ = op.fab("deploy", "--allow-dirty")
        op.fab("env", "--set", "THROTTLE_SUBMIT=1000000/second")
        sql(
            server,
            "INSERT INTO prayer_room_api_location (name, slug, is_active, created_at) "
            f"VALUES ('Bench', '{LOCATION}', true, now())",
        )
        started = time.monotonic()
        fill(server, rows)
        archive_now(server, timeout=600)
        raw["fill_and_archive_s"] = time.monotonic() - started
        raw["database_bytes"] = int(sql(server, "SELECT pg_database_size('prayer_room')"))

        dump_s, out = op.fab("backup")
        dump_name = out.split(":")[0].strip()
        records = json.loads(server.ssh("cat /var/backups/prayer-room/" + shlex.quote(dump_name) + ".json").stdout)
        raw["dump"] = {"fab_s": dump_s, "pg_dump_s": records["seconds"], "bytes": records["size"]}
        started = time.monotonic()
        server.ssh("systemctl start prayer-room-archive-full.service")
        raw["full_backup_s"] = time.monotonic() - started
        info = json.loads(server.ssh("cd / && runuser -u postgres -- pgbackrest info --output=json").stdout)
        newest = info[0]["backup"][-1]
        raw["full_backup"] = {"type": newest["type"], "bytes_in_bucket": newest["info"]["repository"]["delta"]}

        on: list[float] = []
        off: list[float] = []
        for _, side in interleaved(("on", "off"), pairs):
            set_archiving(server, True)
            archive_now(server, timeout=600)  # the WAL an "off" round held back is pushed outside the timed rounds
            if side == "off":
                set_archiving(server, False)
            archived = int(sql(server, "SELECT archived_count FROM pg_stat_archiver"))
            created, failed, seconds = post_for(server.address, round_s)
            pushed = int(sql(server, "SELECT archived_count FROM pg_stat_archiver")) - archived
            (on if side == "on" else off).append(created / seconds)
            raw["rounds"].append({"archiving": side, "created": created, "failed": failed, "seconds": seconds,
                                  "segments_archived": pushed})  # fmt: skip
        set_archiving(server, True)
        archive_now(server, timeout=600)

        target = sql(server, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')")
        while sql(server, f"SELECT clock_timestamp() > '{target}+00'::timestamptz + interval '1 second'") != "t":
            time.sleep(0.2)
        sql(server, "DELETE FROM bench_filler WHERE id <= 1000")
        pitr_s, out = op.fab("restore", "--to-time", f"{target}+00:00", "--yes")
        if int(sql(server, "SELECT count(*) FROM bench_filler")) != rows:
            raise RuntimeError("the point-in-time restore did not bring the deleted rows back")
        raw["pitr"] = {"fab_s": pitr_s, "restore_s": restored_seconds(out)}
        latest_s, out = op.fab("restore", "--latest", "--yes")
        raw["latest"] = {"fab_s": latest_s, "restore_s": restored_seconds(out)}
        dump_restore_s, out = op.fab("restore", dump_name, "--yes")
        raw["dump_restore"] = {"fab_s": dump_restore_s, "restore_s": restored_seconds(out)}
        if int(sql(server, "SELECT count(*) FROM bench_filler")) != rows:
            raise RuntimeError("the dump restore lost rows")
    finally:
        if server is not None:
            server.destroy()
        s3_server.stop()

    gb = raw["database_bytes"] / 1e9
    dump, full = raw["dump"]["pg_dump_s"], raw["full_backup_s"]
    dump_restore = raw["dump_restore"]
    figures = [
        Row("database size", gb, "GB"),
        Row("full backup into the archive (unit) vs pg_dump -Fc (the helper's seconds)", full, "s", baseline=dump),
        Row("fab restore --latest vs fab restore DUMP", raw["latest"]["fab_s"], "s", baseline=dump_restore["fab_s"]),
        Row("  its restore step vs pg_restore", raw["latest"]["restore_s"], "s", baseline=dump_restore["restore_s"]),
        Row("fab restore --to-time vs fab restore DUMP", raw["pitr"]["fab_s"], "s", baseline=dump_restore["fab_s"]),
        Row("  its restore step vs pg_restore", raw["pitr"]["restore_s"], "s", baseline=dump_restore["restore_s"]),
    ]
    throughput = paired("API writes (POST /api/requests/), archiving on vs off", "req/s", on, off)
    throughput.target, throughput.met = ">= 0.95", throughput.ratio >= 0.95
    figures.append(throughput)
    params = {
        "gigabytes": gigabytes,
        "round_s": round_s,
        "pairs": pairs,
        "threads": 4,
        "server": "Debian 13 container (systemd-nspawn) on this machine; S3: moto behind nginx TLS, same machine",
        "baselines": "pg_dump -Fc / restoring that dump (fab backup, fab restore NAME); archive_command emptied",
    }
    return Result("archive", rows=figures, params=params, raw=raw)


def unavailable() -> str | None:
    return missing_tools() or s3.missing_tools()


def run(ctx) -> Result:
    """The suite's entry point."""
    reason = unavailable()
    if reason:
        return Result("archive", skipped=reason)
    workdir = Path(tempfile.mkdtemp(prefix="prayer-room-bench-archive-"))
    try:
        return measure(workdir, quick=ctx.quick)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    from types import SimpleNamespace

    result = run(SimpleNamespace(quick="--quick" in sys.argv[1:]))
    print(table([result]))
    print(f"wrote {write(result)}")
    sys.exit(1 if result.error else 0)
