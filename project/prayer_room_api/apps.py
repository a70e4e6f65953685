from django.apps import AppConfig


class PrayerRoomConfig(AppConfig):
    name = "prayer_room_api"
    verbose_name = "Prayer room"
    default_auto_field = "django.db.models.BigAutoField"
