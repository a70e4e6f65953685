"""WSGI entry point, served by gunicorn through `manage.py prodserver web`."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "prayer_room_api.settings.local")

application = get_wsgi_application()
