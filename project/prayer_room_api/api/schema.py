"""The OpenAPI schema documents the errors each operation can answer, not only its success."""

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What went wrong, for a person to read.")


VALIDATION_ERROR = OpenApiResponse(
    OpenApiTypes.OBJECT,
    description='Invalid input: a list of messages for each field at fault, or {"detail": ...} for a body '
    "that cannot be parsed.",
)
NOT_SIGNED_IN_OR_NOT_ALLOWED = OpenApiResponse(
    ErrorSerializer, description="Credentials were refused, or the user may not do this."
)
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such object, or no such page of the list.")
UNSUPPORTED_MEDIA_TYPE = OpenApiResponse(ErrorSerializer, description="The body is in a format the API does not read.")
RATE_LIMITED = OpenApiResponse(
    ErrorSerializer, description="Too many requests; the Retry-After header says when to retry."
)


class ErrorDocumentingAutoSchema(AutoSchema):
    """drf-spectacular's schema, plus the 4xx answers that DRF gives for each kind of operation."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code, response in self._error_responses():
            responses.setdefault(code, self._get_response_for_code(response, code, direction=direction))
        return responses

    def _error_responses(self):
        has_body = self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None
        has_filters = any(  # a serializer given as parameters becomes query parameters
            not isinstance(parameter, OpenApiParameter) or parameter.location == OpenApiParameter.QUERY
            for parameter in self.get_override_parameters()
        )
        paginated = self._is_list_view() and self._get_paginator() is not None
        if has_body or has_filters:
            yield "400", VALIDATION_ERROR
        yield "403", NOT_SIGNED_IN_OR_NOT_ALLOWED
        if "{" in self.path or paginated:
            yield "404", NOT_FOUND
        if has_body:
            yield "415", UNSUPPORTED_MEDIA_TYPE
        if self.view.get_throttles():
            yield "429", RATE_LIMITED
