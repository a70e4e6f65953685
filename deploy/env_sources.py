"""Where each of the programs' variables comes from (the env file, deploy.toml's `env`, what the kit derives, a
default), which of them `fab env --set/--unset` may change, the KEY=VALUE it reads, and values shown masked."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from deploy.config import DeployConfig
from deploy.errors import DeployError
from deploy.render.programs_env import ENV_FILE_VARIABLE, effective_environment

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EXPECTED = "expected KEY=VALUE (KEY: a letter or _, then letters, digits or _), e.g. fab env --set LOG_LEVEL=info"
MASK = "********"
# A name holding one of these words holds a secret: its value is never shown.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|PASSPHRASE|TOKEN|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_?KEY|AUTH|DSN")
# What the kit derives from deploy.toml: the setting to change instead.
_DERIVED_FROM = {
    "WEB_WORKERS": "web_workers",
    "WORKER_CONCURRENCY": "worker_concurrency",
    "CELERY_TASK_TIME_LIMIT": "task_time_limit",
    "WEB_GRACEFUL_TIMEOUT": "web_graceful_timeout",
    "WORKER_QUEUES": "roles",  # a cluster's host queue
    "ALLOWED_HOSTS": "domain",
    "CSRF_TRUSTED_ORIGINS": "domain",
    "SECURE_SSL_REDIRECT": "domain",
    "SECURE_COOKIES": "domain",
}
# What the kit sets whatever deploy.toml says, and why.
KIT_OWN = {
    ENV_FILE_VARIABLE: "where the programs read this environment",
    "STATIC_ROOT": "each release collects and serves its own static files",
}
# On a cluster with a db host, provision points these at it (the primary's env file is the others' source).
CLUSTER_SERVICE_KEYS = ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")


@dataclass(frozen=True)
class Variable:
    """One variable the programs get: its value (as they see it), where it comes from, whether it is secret."""

    key: str
    value: str
    source: str
    secret: bool

    @property
    def shown(self) -> str:
        return masked(self.key, self.value)


def is_secret(key: str) -> bool:
    return bool(_SECRET_NAME.search(key.upper()))


def masked(key: str, value: str) -> str:
    """`value` fit to print: a secret's replaced whole; a URL's password (and a query's secret parameters) hidden,
    a user name alone before @ too (a DSN's key)."""
    if is_secret(key):
        return MASK if value else ""
    try:
        parts = urlsplit(value)
        netloc, query = parts.netloc, parts.query
    except ValueError:
        return MASK
    if not parts.scheme or not (("@" in netloc) or query):
        return value
    if "@" in netloc:
        userinfo, _, where = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{where}" if has_password else f"{MASK}@{where}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(name, MASK if is_secret(name) else item) for name, item in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def derived_setting(config: DeployConfig, key: str) -> str | None:
    """The deploy.toml setting `key`'s value follows on this site ("kit": the kit's own; None: the env file's)."""
    if key in KIT_OWN:
        return "kit"
    if key == "DJANGO_SETTINGS_MODULE":
        return "settings_module"
    if key in dict(config.extra_env):
        return f"env.{key}"
    overrides = dict(config.environment_overrides())
    if key in overrides:
        return _DERIVED_FROM.get(key, "env")
    if key in CLUSTER_SERVICE_KEYS and config.multi_host and config.db_address:
        return "roles.db"
    return None


def refusal(config: DeployConfig, key: str) -> str | None:
    """Why `fab env` must not set or unset `key` here (the value the kit gives it wins), naming what to change."""
    setting = derived_setting(config, key)
    if setting is None:
        return None
    where = f"[environments.{config.name}]" if config.name != "default" else "[defaults]"
    if setting.startswith("env."):
        return f"{key} is set by deploy.toml's env ({where} env = {{ {key} = ... }}): change it there and `fab deploy`."
    if setting == "roles.db":
        return (
            f"{key} on a cluster is derived from its db host ({where} roles, db = [...]) and written by `fab "
            "provision`: change the db host there and run `fab provision`."
        )
    if setting == "kit":
        return f"{key} is the kit's own ({KIT_OWN[key]}): it cannot be set."
    return (
        f"{key} is derived by the kit from deploy.toml's `{setting}` ({where}): change {setting} there and "
        "`fab deploy`."
    )


def parse_assignment(text: str) -> tuple[str, str]:
    """KEY=VALUE as given to --set; refused with the expected form when malformed."""
    key, sep, value = text.partition("=")
    if not sep or not KEY.fullmatch(key):
        given = f"{key!r}=..." if sep else repr(key)  # NOTE: the value may be a secret: never shown
        raise DeployError(f"cannot set {given}: {EXPECTED}.")
    if "\n" in value or "\r" in value or "\0" in value:
        raise DeployError(f"the value of {key} has a line break or a NUL byte; {EXPECTED}, on one line.")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        raise DeployError(f"the value of {key} is in quotes; {EXPECTED}, the value without them (a shell's own "
                          "quotes around the whole pair are fine).")  # fmt: skip
    return key, value


def parse_key(text: str) -> str:
    """KEY as given to --unset; refused with the expected form when malformed."""
    if not KEY.fullmatch(text):
        raise DeployError(f"cannot unset {text!r}: expected KEY (a letter or _, then letters, digits or _).")
    return text


def parse_changes(config: DeployConfig, sets: Sequence[str], unsets: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The --set pairs and --unset keys, checked: well formed, each key once, none the kit derives."""
    pairs = [parse_assignment(item) for item in sets]
    keys = [parse_key(item) for item in unsets]
    named = [key for key, _ in pairs] + keys
    twice = sorted({key for key in named if named.count(key) > 1})
    if twice:
        raise DeployError(f"{', '.join(twice)} named more than once; set or unset each key once.")
    for key in named:
        why = refusal(config, key)
        if why:
            raise DeployError(why)
    proxies = dict(pairs).get("NUM_PROXIES")
    if _wrong_num_proxies(proxies):
        # NOTE: the value is not a secret; it is named so the operator sees which one was refused.
        raise DeployError(
            f"NUM_PROXIES={proxies} is refused: {_NUM_PROXIES_RISK}. It is 1 on every topology; name a load balancer "
            "or CDN in front in deploy.toml's `trusted_proxies` and `fab deploy` (docs/security.md)."
        )
    return dict(pairs), keys


def variables(config: DeployConfig, env_values: Mapping[str, str]) -> list[Variable]:
    """Each variable the programs get on the host `config` is bound to, with where it comes from, sorted by name."""
    effective = {**effective_environment(config, env_values), ENV_FILE_VARIABLE: str(config.layout.effective_env)}
    defaults = dict(config.environment_defaults())
    extra = dict(config.extra_env)
    overrides = dict(config.environment_overrides())
    rows = []
    for key in sorted(effective):
        ignored = " (over the env file's value)" if key in env_values else ""
        if key in KIT_OWN:
            source = f"kit: {KIT_OWN[key]}"
        elif key in extra:
            source = f"deploy.toml env{ignored}"
        elif key in overrides:
            setting = _DERIVED_FROM.get(key, "env")
            source = f"derived from deploy.toml {setting}{ignored}"
        elif key in env_values:
            setting = derived_setting(config, key)
            source = "env file" + (f" (written by provision from deploy.toml {setting})" if setting else "")
        elif key in defaults:
            source = f"default (deploy.toml {derived_setting(config, key)})"
        else:
            source = "?"
        rows.append(Variable(key, effective[key], source, is_secret(key)))
    return rows


def format_table(rows: Sequence[Variable]) -> str:
    """KEY  VALUE  SOURCE, values masked."""
    table = [("KEY", "VALUE", "SOURCE"), *((row.key, row.shown, row.source) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(2)]
    return "\n".join(
        f"{key.ljust(widths[0])}  {value.ljust(widths[1])}  {source}".rstrip() for key, value, source in table
    )


def num_proxies_warning(config: DeployConfig, env_values: Mapping[str, str]) -> str | None:
    """A WARNING line when the programs' environment sets NUM_PROXIES to anything but 1 (older docs said 2 for a
    cluster or a load balancer): with 2 a client reaching the server directly chooses its own address. None if
    unset or 1."""
    value = effective_environment(config, env_values).get("NUM_PROXIES")
    if not _wrong_num_proxies(value):
        return None
    fix = (
        "remove it from deploy.toml's env"
        if "NUM_PROXIES" in dict(config.extra_env)
        else "run `fab env --unset NUM_PROXIES`"
    )
    return (
        f"WARNING: the programs' environment sets NUM_PROXIES={value}: {_NUM_PROXIES_RISK}; it must be 1 on every "
        f"topology: {fix} (see docs/security.md)."
    )


# NUM_PROXIES other than 1 (what `fab env --set` refuses and `fab deploy` warns of), and why.
_NUM_PROXIES_RISK = "the client address then comes from a header a client can write (login lockouts, throttles)"


def _wrong_num_proxies(value: str | None) -> bool:
    return value is not None and value.strip() != "1"
