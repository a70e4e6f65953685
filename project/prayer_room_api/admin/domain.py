from django.contrib import admin

from prayer_room_api.models import Location, PrayerRequest, UserProfile

admin.site.register(Location)
admin.site.register(PrayerRequest)
admin.site.register(UserProfile)
