from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import views

handler400 = views.bad_request
handler404 = views.not_found

urlpatterns = [
    path("", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("health/", views.health, name="health"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/", include("prayer_room_api.api.urls")),
]
