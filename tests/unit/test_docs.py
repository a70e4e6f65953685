"""`/` is the API's documentation, Swagger UI served from this site's own static files (no CDN)."""

import re


def test_the_root_page_is_swagger_ui_on_the_schema_with_no_file_from_elsewhere(client):
    response = client.get("/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "/api/schema/" in page
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), assets
    assert all(a.startswith("/static/") for a in assets), assets
