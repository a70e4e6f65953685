"""Request body parsing: JSON that Python can read but the API cannot use is a 400, not a 500."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


def _lone_surrogate_in(data) -> bool:
    """True when a string anywhere in the parsed body holds a lone surrogate (a "\\ud800" escape).

    Such a string can be neither stored nor echoed in an error message as UTF-8.
    """
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, also refusing nesting deeper than Python recurses and lone surrogates."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None
        if _lone_surrogate_in(data):
            raise ParseError("JSON parse error - a string holds a lone surrogate, which is not valid Unicode text.")
        return data
