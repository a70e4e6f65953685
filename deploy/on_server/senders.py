"""How a notice leaves: a JSON POST to a webhook, or a mail through the app's EMAIL_URL. Shared by fab (the operator's
machine) and the watchdog on each server (standard library only).

NOTE: no `from __future__` here: this text is inlined into the watchdog's script (deploy/on_server/__init__.py).
"""

import json
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

SEND_TIMEOUT = 10  # seconds per webhook or mail server: an unreachable one must not hold the caller up


def notice(event: str, host: str, severity: str, message: str, release: str = "", at: float | None = None, **extra):
    """The JSON body every target gets: event, host, severity, message, release and time (UTC, ISO 8601), plus
    `text` (one line) so Slack- and Mattermost-style incoming webhooks show it as it is."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))
    text = f"[{severity.upper()}] {event} on {host}: {message}" + (f" (release {release})" if release else "")
    return {"event": event, "host": host, "severity": severity, "message": message, "release": release or None,
            "time": stamp, **extra, "text": text}  # fmt: skip


def is_email(target: str) -> bool:
    return "@" in target and not target.startswith(("http://", "https://"))


def post_webhook(url: str, body: dict, timeout: float = SEND_TIMEOUT) -> None:
    """POST `body` as JSON; raise OSError (with the reason, never the URL: it often holds a token) unless 2xx."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)
    except urllib.error.HTTPError as exc:
        raise OSError(f"the webhook answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OSError(f"the webhook is unreachable ({reason})") from None


def webhook_label(url: str) -> str:
    """A webhook named without its path and query (where services keep the token)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/..."


def send_email(email_url: str, sender: str, to: str, body: dict, timeout: float = SEND_TIMEOUT) -> None:
    """One mail to `to` through EMAIL_URL (smtp://user:pass@host:587/?tls=True, smtps://... or smtp+ssl://...);
    raise OSError saying why not."""
    url = urlsplit(email_url)
    if url.scheme not in ("smtp", "smtps", "smtp+tls", "smtp+ssl"):
        scheme = url.scheme or "unset"
        raise OSError(
            f"EMAIL_URL is {scheme}://, which sends no mail; set an smtp:// one with `fab env --set EMAIL_URL=smtp://...`"
        )
    query = {key: values[-1].lower() for key, values in parse_qs(url.query).items()}
    implicit_tls = url.scheme in ("smtps", "smtp+ssl") or query.get("ssl") in ("true", "1")
    starttls = url.scheme == "smtp+tls" or query.get("tls") in ("true", "1")
    mail = EmailMessage()
    mail["From"], mail["To"] = sender, to
    mail["Subject"] = body["text"][:180]
    mail.set_content("\n".join(f"{key}: {value}" for key, value in body.items() if key != "text") + "\n")
    try:
        kind = smtplib.SMTP_SSL if implicit_tls else smtplib.SMTP
        port = url.port or (465 if implicit_tls else 25)
        with kind(url.hostname or "localhost", port, timeout=timeout) as smtp:
            if starttls:
                smtp.starttls(context=ssl.create_default_context())
            if url.username:
                smtp.login(unquote(url.username), unquote(url.password or ""))
            smtp.send_message(mail)
    except (OSError, smtplib.SMTPException) as exc:
        raise OSError(f"mail to {to} failed ({type(exc).__name__}: {exc})") from None


def sender_address(env: dict) -> str:
    """DEFAULT_FROM_EMAIL of the app's environment, else prayer-room@<this host>."""
    address = parseaddr(env.get("DEFAULT_FROM_EMAIL", ""))[1]
    return env.get("DEFAULT_FROM_EMAIL") if address else f"prayer-room@{socket.getfqdn()}"


def send(target: str, body: dict, env: dict) -> None:
    """Deliver `body` to one target (a webhook URL, or an address mailed through env's EMAIL_URL)."""
    if is_email(target):
        send_email(env.get("EMAIL_URL", ""), sender_address(env), target, body)
    else:
        post_webhook(target, body)
