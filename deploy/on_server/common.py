"""What both on-server helpers share: the env file reader, loading it, the JSON line each command prints, and main.

NOTE: no `from __future__` here: this text is inlined into each helper's script (deploy/on_server/__init__.py).
"""

import argparse
import json
import os
import sys


def read_env_file(text: str) -> dict[str, str]:
    """KEY=value lines (the layout's env file format): blanks and # lines skipped, one pair of quotes stripped."""
    values = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"env file line {number} is not KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_environment(env_file: str, defaults: list[str], overrides: list[str]) -> None:
    """Put --default values, the env file's, then --set overrides into os.environ; make the project importable."""
    values = dict(item.partition("=")[::2] for item in defaults)
    with open(env_file) as handle:
        values.update(read_env_file(handle.read()))
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = value
    os.environ.update(values)
    project = os.path.join(os.getcwd(), "project")
    if project not in sys.path:
        sys.path.insert(0, project)


def database_environment(env=None) -> dict[str, str]:
    """libpq's variables for the env file's DATABASE_URL (from `env`, else os.environ): the password travels in the
    environment, not argv."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    url = urlsplit((os.environ if env is None else env).get("DATABASE_URL", ""))
    if url.scheme not in ("postgres", "postgresql", "pgsql") or not url.path.strip("/"):
        raise ValueError("the env file's DATABASE_URL is not a postgres:// URL with a database name")
    query = dict(parse_qsl(url.query))
    values = {
        # A cluster's URL asks for TLS checked against the cluster CA (sslmode=verify-full, sslrootcert).
        "PGSSLMODE": query.get("sslmode", ""),
        "PGSSLROOTCERT": query.get("sslrootcert", ""),
        "PGHOST": url.hostname or "127.0.0.1",
        "PGPORT": str(url.port or 5432),
        "PGUSER": unquote(url.username or ""),
        "PGPASSWORD": unquote(url.password or ""),
        "PGDATABASE": unquote(url.path.lstrip("/")),
    }
    return {**os.environ, **{key: value for key, value in values.items() if value}}


def emit(**fields) -> None:
    """One JSON line for the caller, on a line of its own even after a command's unfinished line."""
    sys.stdout.flush()
    print("\n" + json.dumps(fields), flush=True)


def dispatch(parser: argparse.ArgumentParser, commands: dict, argv: list[str]) -> int:
    """Parse argv (with --env-file, --default and --set added), load the env file when given, run the command."""
    parser.add_argument("--env-file")
    parser.add_argument("--default", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.env_file:
        load_environment(args.env_file, args.default, args.set)
    return commands[args.command](args)
