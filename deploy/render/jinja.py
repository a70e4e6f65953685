"""The one Jinja2 environment for deploy's templates: strict about undefined values, with the quoting filters."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from deploy.errors import DeployError

REPO_DIR = Path(__file__).resolve().parents[2]
# What `fab provision` puts on a server; each rendered file's first line names its template here.
PROVISION_TEMPLATES = REPO_DIR / "deploy" / "templates" / "provision"

# What no program of the kit may reach: the clouds' metadata services, which hand the instance's credentials to
# whoever asks. Every link-local address (169.254.169.254 on most clouds, fe80::a9fe:a9fe on some), AWS's IPv6
# one and Alibaba Cloud's. Units deny them with IPAddressDeny= (`metadata_networks` in the templates); the app
# and build users' nftables table too (render_egress_firewall).
METADATA_NETWORKS = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def supervisor_escape(value: Any) -> str:
    """Escape `%` for supervisord's `%(name)s` expansion."""
    return str(value).replace("%", "%%")


def shell_join(words: list[Any]) -> str:
    """One command line, each word quoted for the shell-like split supervisord does on `command=`."""
    return shlex.join(str(word) for word in words)


def supervisor_environment(environment: Mapping[str, str]) -> str:
    """An `environment=` value that supervisord parses back into exactly `environment`.

    NOTE: supervisord splits it with a non-POSIX shlex (no escapes inside quotes), strips every
    leading and trailing quote from each value, and its config parser treats " ;" and " #" as
    inline comments: values it cannot carry are refused by name (never printed).
    """
    pairs = []
    for key, raw in environment.items():
        value = str(raw)
        if not _ENV_KEY.fullmatch(key):
            raise DeployError(f"environment variable name {key!r} is not valid; use letters, digits and _.")
        problem = _unrepresentable(value)
        if problem:
            raise DeployError(f"the value of {key} {problem}, which supervisord cannot pass on; change it.")
        quote = "'" if '"' in value else '"'
        pairs.append(f"{key}={quote}{supervisor_escape(value)}{quote}")
    return ",".join(pairs)


def _unrepresentable(value: str) -> str | None:
    if "\n" in value or "\r" in value:
        return "spans several lines"
    if re.search(r"\s[;#]", value):
        return 'contains a space before ";" or "#" (an inline comment for supervisord)'
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        return "starts or ends with a quote"
    if '"' in value and "'" in value:
        return "contains both kinds of quote"
    return None


def nginx_string(text: str) -> str:
    """Text for inside an nginx "...": backslash and quote escaped; `$` would start a variable and has no escape,
    so it is refused."""
    if "$" in text:
        raise DeployError("an nginx string cannot hold '$' (it would be read as a variable).")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def template_environment(template_dir: Path = PROVISION_TEMPLATES) -> jinja2.Environment:
    """The Jinja2 environment for the templates in `template_dir`: StrictUndefined, no autoescape (none of them is
    HTML), and the quoting filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["pct"] = supervisor_escape
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    env.filters["shjoin"] = shell_join
    env.filters["supervisor_env"] = supervisor_environment
    env.filters["nginx_string"] = nginx_string
    env.globals["metadata_networks"] = " ".join(METADATA_NETWORKS)
    return env


def render_template(name: str, **context: Any) -> str:
    """The provision template `name` rendered with `context`."""
    return template_environment().get_template(name).render(**context)
