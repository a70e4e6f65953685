from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("requests", views.PrayerRequestViewSet, basename="request")
router.register("moderation/requests", views.ModerationViewSet, basename="moderation-request")
router.register("locations", views.LocationViewSet, basename="location")

urlpatterns = [
    path("me/preferences/", views.PreferencesView.as_view(), name="preferences"),
    *router.urls,
]
