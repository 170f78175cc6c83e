"""Only stored prediction files are reachable under /storage; traversal gets nowhere."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import RAW, post_image

from utils.api.routes import WholeFileResponse

NO_ROUTE = "Not Found"  # the URL matches no route at all
NO_FILE = "no such stored file"  # the stored-file route refused the names


@pytest.fixture(scope="module")
def stored(shared_client: TestClient) -> dict[str, Any]:
    """One stored prediction of patient P-s, so the URLs below point next to real files."""
    response = post_image(shared_client, (RAW / "7041.png").read_bytes(), "P-s")
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("/storage/../app.py", NO_ROUTE),
        ("/storage/..%2F..%2Fapp.py", NO_ROUTE),
        ("/storage/patients/..%2F..%2Fapp.py", NO_FILE),
        ("/storage/patients/P-s/..%2F..%2F..%2Fapp.py/original.png", NO_ROUTE),
        ("/storage/patients/%2E%2E/%2E%2E/app.py", NO_FILE),
        ("/storage/patients/P-s/x/original.png", NO_FILE),
        ("/storage/patients/P-s", NO_ROUTE),
        ("/storage/mlflow.db", NO_ROUTE),
        ("/storage/patients/P-s/%2e%2e%2f%2e%2e%2fpredictions.db/x.png", NO_ROUTE),
    ],
)
def test_traversal_and_unknown_paths_404(shared_client: TestClient, stored: dict[str, Any], url: str,
                                         detail: str) -> None:
    response = shared_client.get(url)
    assert (response.status_code, response.json()) == (404, {"detail": detail})


def test_stored_file_served_and_other_files_of_the_folder_not(shared_client: TestClient) -> None:
    film = (RAW / "7042.png").read_bytes()
    body = post_image(shared_client, film, "P-s2").json()
    served = shared_client.get(body["original_url"])
    assert (served.status_code, served.content) == (200, film)
    storage_dir = shared_client.app.state.settings.storage_dir  # type: ignore[attr-defined]
    (storage_dir / body["original_path"]).with_name("notes.txt").write_text("a file no prediction writes")
    response = shared_client.get(body["original_url"].replace("original.png", "notes.txt"))
    assert (response.status_code, response.json()) == (404, {"detail": NO_FILE})


def test_a_read_with_a_bogus_content_length_still_gets_the_whole_file(shared_client: TestClient,
                                                                      stored: dict[str, Any]) -> None:
    """The upload limit (utils/api/body_limit.py) applies to requests that carry a body: a GET claiming a huge
    Content-Length is served as any other (the file's response listens on the same receive channel)."""
    plain = shared_client.get(stored["original_url"])
    claimed = shared_client.get(stored["original_url"], headers={"Content-Length": "99999999"})
    assert claimed.status_code == 200 and claimed.content == plain.content == (RAW / "7041.png").read_bytes()


@pytest.mark.parametrize("range_header", ["bytes=abc", "bytes=99999999-", "bytes=0-9", "bytes=0-1,5-9", "lines=1-2"])
def test_a_range_header_is_ignored_and_the_whole_file_served(shared_client: TestClient, stored: dict[str, Any],
                                                             range_header: str) -> None:
    """Stored files are served whole (`Accept-Ranges: none`): a malformed or unsatisfiable range was answered
    with Starlette's plain-text 400 or 416, and the audit row, written when the route returned, said 200."""
    response = shared_client.get(stored["original_url"], headers={"Range": range_header})
    assert response.status_code == 200 and response.content == (RAW / "7041.png").read_bytes()
    assert response.headers["accept-ranges"] == "none" and "content-range" not in response.headers


def test_a_file_removed_after_the_route_answered_is_still_sent_whole(tmp_path: Path) -> None:
    """An erasure may remove a stored file between the route's answer and its sending (Starlette's FileResponse
    opened the file only then, and raised: a 500): the answer holds the file open from the start."""
    stored_file = tmp_path / "heatmap.png"
    stored_file.write_bytes(b"\x89PNG" + bytes(range(256)) * 2000)
    response = WholeFileResponse(stored_file)
    stored_file.unlink()
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with ThreadPoolExecutor(1) as thread:  # a loop of its own: another test's may still run in this thread
        thread.submit(asyncio.run, response({"type": "http", "method": "GET"}, receive, send)).result()
    headers = dict(messages[0]["headers"])
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert (messages[0]["status"], headers[b"content-type"]) == (200, b"image/png")
    assert body == b"\x89PNG" + bytes(range(256)) * 2000
    assert headers[b"content-length"] == str(len(body)).encode() and messages[-1]["more_body"] is False


def test_head_of_a_stored_file_gives_its_headers_without_the_body(shared_client: TestClient,
                                                                  stored: dict[str, Any]) -> None:
    """A client may ask for a file's size and type first (HEAD): it was answered 405."""
    response = shared_client.head(stored["original_url"])
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-type"] == "image/png"
    assert int(response.headers["content-length"]) == len((RAW / "7041.png").read_bytes())
    assert shared_client.head(stored["original_url"].replace("original.png", "nothing.png")).status_code == 404


@pytest.mark.parametrize("url", ["/", "/viewer/app.js", "/docs-assets/swagger-ui.css"])
@pytest.mark.parametrize("range_header", ["bytes=5-1", "bytes=99999999-", "garbage", "bytes=0-9"])
def test_the_pages_and_their_assets_are_sent_whole_whatever_range_asks(shared_client: TestClient, url: str,
                                                                        range_header: str) -> None:
    """Starlette answered a malformed or unsatisfiable Range on the viewer page and on the viewer's and Swagger
    UI's assets with a plain-text 400 or 416; they are sent whole, as stored files are."""
    whole = shared_client.get(url)
    response = shared_client.get(url, headers={"Range": range_header})
    assert whole.status_code == response.status_code == 200, response.text[:200]
    assert response.content == whole.content and response.headers["accept-ranges"] == "none"
