"""The root helper: runs ON a server as root with the system's python3 (standard library only, no release code).

Backups (pg_dump/pg_restore/psql from the server), restore, and restarting supervisord's programs through its
XML-RPC socket. The kit sends it as `python3 -c <script>` (deploy/on_server/common.py inlined); the daily backup
timer runs provision's root-owned copy of the same script. Each command prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from deploy.on_server.common import database_environment, dispatch, emit

BACKUP_SUFFIX = ".dump"


def pg_tool(args, name: str) -> str:
    """pg_dump, pg_restore or psql: from --pg-bin when given, else the PATH's (Debian's postgresql-client)."""
    return os.path.join(args.pg_bin, name) if args.pg_bin else name


def sha256_of(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Unusable(Exception):
    """The backups directory cannot be used (it is a file, or unreadable): one line for the caller."""


def unusable(directory: str, exc: OSError) -> Unusable:
    reason = "Not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
    return Unusable(f"the backups directory {directory} cannot be used ({reason})")


def read_backups(directory: str) -> list[dict]:
    """The backups' records (name, release, kind, created, size, sha256), oldest first."""
    records = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:  # e.g. a file where the directory should be
        raise unusable(directory, exc) from None
    for name in names:
        if name.endswith(BACKUP_SUFFIX + ".json"):
            try:
                with open(os.path.join(directory, name)) as handle:
                    records.append(json.load(handle))
            except (OSError, ValueError):
                continue
    return sorted(records, key=lambda r: (r.get("created", 0), r.get("name", "")))


def backup(args) -> int:
    """pg_dump -Fc into the root-only backups directory, with a record of its release, size and sha256.

    Keeps the newest --keep backups of the same kind (0: all).
    """
    import subprocess

    try:
        os.makedirs(args.dir, mode=0o700, exist_ok=True)
        os.chmod(args.dir, 0o700)
    except OSError as exc:
        raise unusable(args.dir, exc) from None
    now = time.time()
    release = args.release
    if not release and args.release_link:
        release = os.path.basename(os.path.realpath(args.release_link)) if os.path.islink(args.release_link) else ""
    release = release or "none"
    name = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{args.kind}-{release}{BACKUP_SUFFIX}"
    path = os.path.join(args.dir, name)
    partial = path + ".partial"
    started = time.monotonic()
    try:
        env = database_environment()
    except ValueError as exc:
        emit(ok=False, error=str(exc))
        return 1
    os.umask(0o077)
    run = subprocess.run(
        [pg_tool(args, "pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--file={partial}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode != 0:
        if os.path.exists(partial):
            os.unlink(partial)
        emit(ok=False, error=f"pg_dump failed: {run.stderr.strip()[-1000:]}")
        return 1
    os.rename(partial, path)
    record = {
        "name": name,
        "release": release,
        "kind": args.kind,
        "created": int(now),
        "size": os.path.getsize(path),
        "sha256": sha256_of(path),
        "seconds": round(time.monotonic() - started, 2),
    }
    with open(path + ".json", "w") as handle:
        json.dump(record, handle)
    removed = []
    if args.keep:
        same = [r for r in read_backups(args.dir) if r.get("kind") == args.kind]
        for old in same[: max(0, len(same) - args.keep)]:
            for suffix in ("", ".json"):
                try:
                    os.unlink(os.path.join(args.dir, old["name"] + suffix))
                except FileNotFoundError:
                    pass
            removed.append(old["name"])
    emit(ok=True, backup=record, removed=removed)
    return 0


def backups(args) -> int:
    emit(ok=True, backups=read_backups(args.dir), now=int(time.time()))
    return 0


def passfile_line(password: str) -> str:
    """A libpq password file's line giving `password` to the one connection it is made for (\\ and : escaped)."""
    return "*:*:*:*:" + password.replace("\\", "\\\\").replace(":", "\\:") + "\n"


def unprivileged(name: str, env: dict[str, str]):
    """A private directory for the database tools run as the unprivileged OS user `name`, holding the password
    file (0600, theirs alone: never on a command line nor in an environment another user may read), and the
    subprocess.run keywords that run a tool there as that user with only the connection's variables."""
    import pwd
    import tempfile

    account = pwd.getpwnam(name)
    if account.pw_uid == 0:
        raise ValueError(f"{name} is root: a restore runs as an unprivileged user")
    workdir = tempfile.mkdtemp(prefix="prayer-room-restore-")  # 0700, root's until it is handed over
    passfile = os.path.join(workdir, "pgpass")
    handle = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(handle, "w") as out:
        out.write(passfile_line(env.get("PGPASSWORD", "")))
    for path in (passfile, workdir):
        os.chown(path, account.pw_uid, account.pw_gid)
    keep = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE")
    child = {key: value for key, value in env.items() if value and (key in keep or key.startswith("PGSSL"))}
    child.update(PGPASSFILE=passfile, HOME=workdir, PATH="/usr/bin:/bin", LC_ALL="C.UTF-8")
    run = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": child, "cwd": workdir}
    return workdir, run


ASIDE_PREFIX = "public_before_restore_"


def psql_runner(args, run: dict):
    """A function running one of this helper's fixed statements through psql as the restore's unprivileged user
    (never a dump's text: psql obeys backslash commands); each call is one transaction."""
    import subprocess

    def sql(statement: str, *, rows: bool = False) -> subprocess.CompletedProcess:
        argv = [pg_tool(args, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *(["-At"] if rows else []), "-c", statement]
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **run)

    return sql


def aside_name(text: str) -> str:
    """A schema name a restore keeps the replaced database in: public_before_restore_<epoch seconds>."""
    if not (text.startswith(ASIDE_PREFIX) and text.removeprefix(ASIDE_PREFIX).isdigit()):
        raise ValueError(f"{text!r} is not {ASIDE_PREFIX}<epoch seconds>")
    return text


def recover_interrupted(sql, *, put_back: str = "", check: bool = False) -> dict:
    """Settle what a restore stopped between its transactions left (a kill, a power cut): the schema it had renamed
    aside, `public_before_restore_TIME`, holding the database as it was before that restore.

    The newest such schema is put back as `public`, in one transaction, when `public` is empty (that restore's own
    transaction never committed); when `public` holds tables (what that restore committed, or what was written
    since) both are kept, and the answer says so. `put_back` names the schema of a restore the caller knows failed:
    that one is put back whatever `public` holds. {} when there is nothing to settle; else schema, action ("put
    back" or "kept") and a note for the operator. `check`: change nothing, only say what is there (action "found",
    and how many relations `public` holds)."""
    # Only names aside_name accepts: the app role owns the database and can create a schema with the prefix, whose
    # name would reach psql (the RENAME below) and the operator's messages.
    which = f"= '{aside_name(put_back)}'" if put_back else f"~ '^{ASIDE_PREFIX}[0-9]+$'"
    found = sql(
        "SELECT n.nspname, (SELECT count(*) FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace) "
        f"FROM pg_namespace n WHERE n.nspname {which} ORDER BY n.nspname DESC LIMIT 1",
        rows=True,
    )
    if found.returncode != 0:
        raise RuntimeError(f"looking for an interrupted restore failed: {found.stderr.strip()[-300:]}")
    if not found.stdout.strip():
        return {}
    aside, relations = found.stdout.strip().split("|")
    stamp = aside.removeprefix(ASIDE_PREFIX)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(stamp))) if stamp.isdigit() else "an unknown time"
    if check:
        state = "after it had committed" if int(relations) else "before it committed (public is empty)"
        return {
            "schema": aside,
            "action": "found",
            "public_relations": int(relations),
            "note": f"a restore was interrupted at {when} {state}: schema {aside} holds the database as it was "
            "before that restore",
        }
    if int(relations) and not put_back:
        return {
            "schema": aside,
            "action": "kept",
            "note": f"a restore was interrupted at {when} after it had committed: schema {aside} still holds the "
            "database as it was before it (the backup that restore took first holds it too), public what it "
            f"restored or what was written since; once the site is right, drop it as the database's owner (DROP "
            f"SCHEMA {aside} CASCADE)",
        }
    # DROP SCHEMA without CASCADE refuses a schema that holds anything: only an empty public is replaced unasked.
    drop = "DROP SCHEMA public CASCADE" if put_back else "DROP SCHEMA public"
    back = sql(f"{drop}; ALTER SCHEMA {aside} RENAME TO public;")
    if back.returncode != 0:
        raise RuntimeError(f"putting schema {aside} back as public failed: {back.stderr.strip()[-300:]}")
    return {
        "schema": aside,
        "action": "put back",
        "note": f"a restore interrupted at {when} had left the database in schema {aside}: it is public again, as "
        "it was before that restore",
    }


def restore(args) -> int:
    """Replace the database's public schema with a backup's: all of it or nothing.

    The checksum is checked first. The dump goes to `pg_restore --dbname` (one transaction; never through psql,
    which would obey backslash commands hidden in the object names the app role controls), run as the
    unprivileged --as-user, not root, reading the dump from a descriptor root opened. The schema it replaces is
    kept aside meanwhile (psql runs only this helper's fixed statements): dropped on success, put back on a
    failure; a restore stopped in between is settled by `recover` (the next restore runs it first). Tables the
    backup does not have (from later migrations) go too.
    """
    import shutil
    import subprocess

    records = {r["name"]: r for r in read_backups(args.dir)}
    record = records.get(args.name)
    path = os.path.join(args.dir, args.name)
    if record is None or not os.path.exists(path):
        emit(ok=False, error=f"there is no backup {args.name}; `fab backups` lists them")
        return 1
    if sha256_of(path) != record["sha256"]:
        emit(ok=False, error=f"{args.name} does not match its recorded sha256: the file is damaged; nothing restored")
        return 1
    try:
        workdir, run = unprivileged(args.as_user, database_environment())
    except (ValueError, KeyError) as exc:
        emit(ok=False, error=f"cannot restore as {args.as_user!r}: {exc}; run `fab provision`")
        return 1
    started = time.monotonic()
    aside = args.aside or f"{ASIDE_PREFIX}{int(time.time())}"
    sql = psql_runner(args, run)

    try:
        try:
            interrupted = recover_interrupted(sql)
        except RuntimeError as exc:
            emit(ok=False, error=f"restoring {args.name} failed, the database is unchanged: {exc}")
            return 1
        moved = sql(f"ALTER SCHEMA public RENAME TO {aside}; CREATE SCHEMA public;")
        if moved.returncode != 0:
            emit(ok=False, error=f"restoring {args.name} failed, the database is unchanged: {moved.stderr.strip()}")
            return 1
        with open(path, "rb") as dump:
            restored = subprocess.run(
                [pg_tool(args, "pg_restore"), "--single-transaction", "--exit-on-error", "--no-owner",
                 "--no-privileges", "--dbname", run["env"].get("PGDATABASE", "")],
                stdin=dump, capture_output=True, text=True, **run,
            )  # fmt: skip
        if restored.returncode != 0:
            back = sql(f"DROP SCHEMA public CASCADE; ALTER SCHEMA {aside} RENAME TO public;")
            state = (
                "the database is unchanged (one transaction)"
                if back.returncode == 0
                else f"AND putting the schema back failed ({back.stderr.strip()[-300:]}): it is in schema {aside}"
            )
            emit(ok=False, error=f"restoring {args.name} failed, {state}: {restored.stderr.strip()[-1000:]}")
            return 1
        dropped = sql(f"DROP SCHEMA {aside} CASCADE;")
        warning = {} if dropped.returncode == 0 else {"warning": f"schema {aside} stays: {dropped.stderr.strip()}"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(ok=True, restored=record, seconds=round(time.monotonic() - started, 2), interrupted=interrupted, **warning)
    return 0


def recover(args) -> int:
    """Settle a restore stopped between its transactions (`recover_interrupted`); --put-back SCHEMA when the caller
    knows the restore it ran (with --aside SCHEMA) failed; --check to only look."""
    import shutil

    try:
        workdir, run = unprivileged(args.as_user, database_environment())
    except (ValueError, KeyError) as exc:
        emit(ok=False, error=f"cannot check for an interrupted restore as {args.as_user!r}: {exc}")
        return 1
    try:
        interrupted = recover_interrupted(psql_runner(args, run), put_back=args.put_back, check=args.check)
    except ValueError as exc:
        emit(ok=False, error=f"--put-back: {exc}")
        return 1
    except RuntimeError as exc:
        emit(ok=False, error=str(exc))
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(ok=True, interrupted=interrupted)
    return 0


def supervisor_rpc(socket_path: str):
    """An XML-RPC proxy to supervisord over its unix socket, with the standard library only."""
    import http.client
    import socket
    import xmlrpc.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(socket_path)

    class UnixTransport(xmlrpc.client.Transport):
        def make_connection(self, host):
            return UnixConnection("localhost")

    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport())


def cycle(args) -> int:
    """Stop each program (waiting: TERM, then its graceful stop), then start it without waiting for startsecs.

    The caller's health check is the real readiness test, so `supervisorctl restart`'s wait is saved.
    """
    import xmlrpc.client

    rpc = supervisor_rpc(args.socket)
    for name in args.names:
        try:
            rpc.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != 70:  # NOT_RUNNING is fine
                emit(ok=False, error=f"stopping {name}: {fault.faultString}")
                return 1
        try:
            rpc.supervisor.startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            emit(ok=False, error=f"starting {name}: {fault.faultString}")
            return 1
    emit(ok=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="root_helper")
    sub = parser.add_subparsers(dest="command", required=True)
    cycle_parser = sub.add_parser("cycle")
    cycle_parser.add_argument("--socket", required=True)
    cycle_parser.add_argument("names", nargs="+")
    backup_parser = sub.add_parser("backup")
    backup_parser.add_argument("--kind", default="manual")
    backup_parser.add_argument("--release", default="")
    backup_parser.add_argument("--release-link", default="", help="name the backup after this symlink's target")
    backup_parser.add_argument("--keep", type=int, default=0)
    restore_parser = sub.add_parser("restore")
    restore_parser.add_argument("name")
    recover_parser = sub.add_parser("recover")
    restore_parser.add_argument("--aside", type=aside_name, default="", help="the schema the replaced one is kept in")
    recover_parser.add_argument("--put-back", default="", help="the --aside of a restore that failed: undo it")
    recover_parser.add_argument("--check", action="store_true", help="change nothing: say what a restore left")
    for p in (restore_parser, recover_parser):
        p.add_argument("--as-user", required=True, help="the unprivileged OS user pg_restore and psql run as")
    for p in (backup_parser, restore_parser, recover_parser, sub.add_parser("backups")):
        p.add_argument("--dir", required=True)
        p.add_argument("--pg-bin", default="", help="the directory of pg_dump, pg_restore and psql")
    commands = {"backup": backup, "backups": backups, "restore": restore, "recover": recover, "cycle": cycle}
    try:
        return dispatch(parser, commands, argv)
    except Unusable as exc:
        emit(ok=False, error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
