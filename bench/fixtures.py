"""Data the benchmarks need, bulk-inserted through the ORM (Django must be set up)."""

from __future__ import annotations

from datetime import timedelta


def location():
    from prayer_room_api.models import Location

    return Location.objects.get_or_create(slug="bench", defaults={"name": "Bench"})[0]


def approved_requests(count: int) -> None:
    """`count` approved public requests, as the public list endpoint serves them."""
    from django.utils import timezone

    from prayer_room_api.models import PrayerRequest

    now, place = timezone.now(), location()
    PrayerRequest.objects.bulk_create(
        [
            PrayerRequest(
                content=f"Please pray for request number {i}: " + "words of a real request " * 8,
                name=f"Person {i}",
                type=PrayerRequest.Type.PRAYER if i % 3 else PrayerRequest.Type.PRAISE,
                location=place,
                approved_at=now - timedelta(minutes=i),
                prayer_count=i % 17,
            )
            for i in range(count)
        ],
        batch_size=1000,
    )


def digest_users(count: int, frequency: str = "daily", requests_each: int = 2) -> None:
    """`count` users opted in to `frequency` digests, each with requests, one answered, prayed for."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from prayer_room_api import models

    User = get_user_model()
    now, place = timezone.now(), location()
    users = User.objects.bulk_create(
        [User(username=f"bench{i}", email=f"bench{i}@example.org", password="!") for i in range(count)],
        batch_size=2000,
    )
    ids = [user.pk for user in users]
    # Bulk inserts send no post_save signal: create the profiles the signal would have made.
    has_profile = set(models.UserProfile.objects.filter(user_id__in=ids).values_list("user_id", flat=True))
    models.UserProfile.objects.bulk_create(
        [models.UserProfile(user_id=pk) for pk in ids if pk not in has_profile], batch_size=2000
    )
    models.UserProfile.objects.filter(user_id__in=ids).update(digest_frequency=frequency)
    requests = models.PrayerRequest.objects.bulk_create(
        [
            models.PrayerRequest(
                content=f"Request {n} of user {pk}",
                location=place,
                author_id=pk,
                approved_at=now - timedelta(hours=6),
                prayer_count=3,
                response="We prayed with you." if n == 0 else "",
                responded_at=now - timedelta(hours=2) if n == 0 else None,
            )
            for pk in ids
            for n in range(requests_each)
        ],
        batch_size=2000,
    )
    prayer_model = getattr(models, "Prayer", None)
    if prayer_model is not None:
        prayer_model.objects.bulk_create(
            [prayer_model(request=r, created_at=now - timedelta(hours=h)) for r in requests for h in (1, 3, 5)],
            batch_size=5000,
        )
