"""Swagger UI and ReDoc render from the app's own files: no request leaves the machine, and no API key is needed."""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import Page, expect

from bench.harness import Server

TITLE = "Bone age estimation"


def test_docs_pages_load_only_the_apps_own_files_and_need_no_key(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=30) as client:
        assert client.get("/results/anyone").status_code == 401  # keys are configured ...
        for page in ("/docs", "/redoc"):
            html = client.get(page)  # ... and the docs stay open
            assert html.status_code == 200, page
            assert re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", html.text) == [], page
            for asset in re.findall(r"""(?:src|href)=["']?(/docs-assets/[\w.-]+)""", html.text):
                assert client.get(asset).status_code == 200, asset


def test_swagger_ui_lists_the_routes_without_internet(page: Page, server: Server, outside_requests: list[str]) -> None:
    page.goto(f"{server.base_url}/docs")
    expect(page.locator(".information-container .title")).to_contain_text(TITLE)
    for path in ("/predict", "/results/{patient_id}", "/health"):
        expect(page.locator(f'.opblock-summary-path[data-path="{path}"]')).to_be_visible()
    assert outside_requests == []


def test_redoc_renders_the_api_without_internet(page: Page, server: Server, outside_requests: list[str]) -> None:
    page.goto(f"{server.base_url}/redoc")
    expect(page.locator("h1")).to_contain_text(TITLE)
    for method, path in (("post", "/predict"), ("get", "/results/{patient_id}")):
        expect(page.get_by_role("button", name=f"{method} {path}", exact=True)).to_be_visible()
    assert outside_requests == []
