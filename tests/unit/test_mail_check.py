"""The deploy's mail check: a connection to EMAIL_URL's server, no mail sent; a warning saying what to set."""

import pytest

from deploy.on_server.app_helper import mail_server_warning
from tests.faults.smtp import Sink
from tests.support.stack import free_port


@pytest.fixture
def smtp(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_USE_TLS, settings.EMAIL_HOST_USER = "127.0.0.1", False, ""
    return settings


def test_a_server_that_accepts_connections_passes_and_gets_no_mail(smtp):
    sink = Sink()
    try:
        smtp.EMAIL_PORT = sink.port
        assert mail_server_warning("/srv/prayer-room/shared/env") is None
        assert sink.accepted == [] and sink.mails == 0
    finally:
        sink.close()


def test_no_server_is_one_warning_naming_what_to_set(smtp):
    smtp.EMAIL_PORT = free_port()
    warning = mail_server_warning("/srv/prayer-room/shared/env")
    assert f"127.0.0.1:{smtp.EMAIL_PORT}" in warning and "ConnectionRefusedError" in warning
    assert "set it with `fab env --set EMAIL_URL=smtp+tls://" in warning and "/srv/prayer-room/shared/env" in warning
    assert "fab deploy" not in warning
    assert "\n" not in warning


def test_other_backends_are_not_checked(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
    assert mail_server_warning("env") is None
