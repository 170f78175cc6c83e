"""Only stored prediction files are reachable under /storage; traversal gets nowhere."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import RAW, post_image


@pytest.mark.parametrize(
    "url",
    [
        "/storage/../app.py",
        "/storage/..%2F..%2Fapp.py",
        "/storage/patients/..%2F..%2Fapp.py",
        "/storage/patients/P-s/..%2F..%2F..%2Fapp.py/original.png",
        "/storage/patients/%2E%2E/%2E%2E/app.py",
        "/storage/patients/P-s/x/original.png",
        "/storage/patients/P-s",
        "/storage/mlflow.db",
        "/storage/patients/P-s/%2e%2e%2f%2e%2e%2fpredictions.db/x.png",
    ],
)
def test_traversal_and_unknown_paths_404(shared_client: TestClient, url: str) -> None:
    post_image(shared_client, (RAW / "7041.png").read_bytes(), "P-s")
    response = shared_client.get(url)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_stored_file_served_and_other_files_of_the_folder_not(shared_client: TestClient) -> None:
    body = post_image(shared_client, (RAW / "7042.png").read_bytes(), "P-s2").json()
    assert shared_client.get(body["original_url"]).status_code == 200
    other = body["original_url"].replace("original.png", "notes.txt")
    assert shared_client.get(other).status_code == 404
