"""fab's announcements: each deploy, rollback, restore, env change, maintenance switch and os-update, with its
result, to deploy.toml's `notify` targets; and the watchdog's open alerts for `fab status`.

Webhooks are posted from the operator's machine; mail goes through the primary's watchdog (`announce`), which
sends it with the programs' EMAIL_URL and keeps it for its next run if the mail server does not answer. Neither
ever fails the command: an announcement that does not get out is one WARNING line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from deploy.commands import watchdog as watchdog_commands
from deploy.config import DeployConfig, address_of
from deploy.errors import DeployError
from deploy.lock import holder_name
from deploy.on_server.senders import is_email, notice, post_webhook, webhook_label
from deploy.ssh import Server

ACTIONS = ("deploy", "rollback", "restore", "env", "maintenance", "os-update")


def announcement(config: DeployConfig, action: str, ok: bool, message: str, *, release: str = "") -> dict:
    """The notice for one command's result: severity info when it succeeded, error when it failed."""
    result = "succeeded" if ok else "FAILED"
    host = address_of(config.site_hosts[0]) if len(config.site_hosts) == 1 else config.name
    return notice(
        action,
        host,
        "info" if ok else "error",
        f"{action} {result}: {message}" if message else f"{action} {result}",
        release,
        result="ok" if ok else "failed",
        site=config.name,
        by=holder_name(),
    )


def announce(config: DeployConfig, body: dict, server: Server | None = None, out: TextIO | None = None) -> int:
    """Send `body` to every notify target: webhooks from here, email addresses through `server`'s watchdog (the
    primary). Returns how many targets got it; each one that did not is one WARNING line on `out`."""
    out = out or sys.stderr
    sent = 0
    for target in config.notify:
        if is_email(target):
            continue
        try:
            post_webhook(target, body)
            sent += 1
        except OSError as exc:
            print(f"WARNING: {body['event']} not announced to {webhook_label(target)}: {exc}", file=out, flush=True)
    emails = [target for target in config.notify if is_email(target)]
    if emails and server is None:
        print(f"WARNING: {body['event']} not mailed to {', '.join(emails)}: no connection to the primary", file=out)
    elif emails:
        try:
            result = server.root(watchdog_commands.announce(server.config, body), what="mailing the announcement",
                                 timeout=60)  # fmt: skip
            answer = json.loads(result.stdout.strip().splitlines()[-1])
            sent += answer.get("sent", 0)
            if answer.get("waiting"):
                print(
                    f"WARNING: {body['event']} not mailed yet ({answer['waiting']} waiting): the primary's watchdog "
                    "tries again every minute",
                    file=out,
                )
        except (DeployError, ValueError, IndexError) as exc:
            print(f"WARNING: {body['event']} not mailed to {', '.join(emails)}: {exc}", file=out, flush=True)
    return sent


def open_alerts(server: Server, now: float | None = None) -> list[str]:
    """`fab status`'s lines for one host's open watchdog alerts (and notices waiting for an unreachable target)."""
    result = server.root(watchdog_commands.status(server.config), what="reading the watchdog's state", warn=True)
    try:
        state = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"alerts: unavailable ({(result.stderr or result.stdout).strip()[-200:] or 'no answer'})"]
    if state.get("installed") is False:
        return ["alerts: no watchdog on this host (`fab provision` installs it)"]
    now = time.time() if now is None else now
    lines = []
    for key, alert in sorted(state.get("open", {}).items()):
        minutes = max(0, round((now - alert["since"]) / 60))
        lines.append(f"  {alert['severity']:8} {key}: {alert['message']} (for {minutes} min)")
    checked = state.get("checked_at")
    age = f", last check {round(now - checked)} s ago" if checked else ", not run yet"
    waiting = f"; {state['outbox']} notice(s) not sent yet" if state.get("outbox") else ""
    head = f"alerts: {len(lines)} open{age}{waiting}"
    return [head, *lines]


def announce_record(config: DeployConfig, record: dict, what: str, server: Server | None = None) -> None:
    """Announce a history record (deploy/history.py) of one of ACTIONS (`what`: its release, commit, migrations,
    backup, detail) to the notify targets; a provision is not announced. Never raises: the command's outcome
    stands."""
    event = str(record.get("event") or "")
    if not config.notify or event.split(" ")[0] not in ACTIONS:
        return
    ok = record.get("result") == "ok"
    took = f" ({record['seconds']} s)" if record.get("seconds") is not None else ""
    message = (what if what != "-" else "") + took if ok else str(record.get("message") or "")
    try:
        body = announcement(config, event, ok, message.strip(), release=str(record.get("release") or ""))
        body.update(host=record.get("host") or body["host"], by=record.get("who") or body["by"])
        announce(config, body, server)
    except Exception as exc:  # noqa: BLE001 - an announcement never changes the command's outcome
        print(f"WARNING: {event} not announced: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
