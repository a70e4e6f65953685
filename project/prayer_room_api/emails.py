"""The emails the prayer room sends, each as plain text with an HTML alternative."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string

TEMPLATE_DIR = "prayer_room_api/emails"


def _message(template: str, subject: str, to: str, context: dict) -> EmailMultiAlternatives:
    """Render `<template>.txt` and `<template>.html` with `context` into one email to `to`."""
    text = render_to_string(f"{TEMPLATE_DIR}/{template}.txt", context)
    html = render_to_string(f"{TEMPLATE_DIR}/{template}.html", context)
    message = EmailMultiAlternatives(subject=subject, body=text, from_email=settings.DEFAULT_FROM_EMAIL, to=[to])
    message.attach_alternative(html, "text/html")
    return message


def _greeting_name(user) -> str:
    return user.get_full_name() or user.get_username()


def user_digest(user, requests, *, kind: str, since: datetime, until: datetime) -> EmailMultiAlternatives:
    """A user's daily or weekly digest: responses and new prayers on their own requests."""
    responded = [r for r in requests if r.responded_at and since < r.responded_at <= until]
    prayed = [r for r in requests if r.new_prayers]
    context = {
        "name": _greeting_name(user),
        "kind": kind,
        "since": since,
        "responded": responded,
        "prayed": prayed,
        "new_prayers_total": sum(r.new_prayers for r in prayed),
    }
    return _message("user_digest", f"Your {kind} prayer room digest", user.email, context)


def moderator_digest(
    user, pending, flagged, *, pending_total: int, flagged_total: int, since: datetime | None
) -> EmailMultiAlternatives:
    """A staff member's digest of the requests waiting for moderation and those flagged."""
    context = {
        "name": _greeting_name(user),
        "pending": pending,
        "flagged": flagged,
        "pending_total": pending_total,
        "flagged_total": flagged_total,
        "pending_more": pending_total - len(pending),
        "flagged_more": flagged_total - len(flagged),
        "since": since,
    }
    subject = f"Prayer room moderation: {pending_total} pending, {flagged_total} flagged"
    return _message("moderator_digest", subject, user.email, context)


def response_notification(request) -> EmailMultiAlternatives:
    """Tells the author that staff responded to their request, with the response."""
    context = {"name": _greeting_name(request.author), "request": request}
    subject = f"A response to your {request.get_type_display().lower()} request"
    return _message("response_notification", subject, request.author.email, context)
