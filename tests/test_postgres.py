"""What only PostgreSQL has: a password in the database URL, which must never reach a log or a response."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import RAW, make_settings, post_image, running_app
from sqlalchemy import make_url

FILM = (RAW / "7043.png").read_bytes()


@pytest.mark.postgresql
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_database_password_never_reaches_a_log_or_a_response(tmp_path: Path, database_url: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    password = make_url(database_url).password
    assert password
    caplog.set_level(logging.DEBUG)
    with running_app(make_settings(tmp_path, database_url=database_url)) as client:
        responses = [post_image(client, FILM, "P-pw"), client.get("/health"), client.get("/results/P-pw")]
    assert [r.status_code for r in responses] == [200] * 3
    assert "bone age service ready" in caplog.text  # the start-up line that names the database
    assert password not in caplog.text
    assert not [r.url for r in responses if password in r.text]
