"""Keys with roles: each role reaches its routes and no other (403, audited), no key or a wrong one gets 401, the flat
BONEAGE_API_KEYS keys have every role but admin, and no key ever reaches a response, a log line, a metric or the
audit. Also the keys file: digests only, and a malformed line stops the start naming the line, never a key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import RAW, make_settings, running_app
from patient_data import FLAT_KEY, KEYS, audit_rows, header, write_keys_file

from utils.api.auth import FLAT_KEY_ROLES, KeyFileError, KeyRing, Role, main, read_key_file

FILM = (RAW / "7047.png").read_bytes()


def upload(client: object, patient_id: str, headers: dict[str, str]) -> int:
    response = client.post("/predict", files={"image": ("x.png", FILM, "image/png")},  # type: ignore[attr-defined]
                           data={"patient_id": patient_id}, headers=headers)
    return int(response.status_code)


def test_each_role_reaches_its_routes_and_no_other_and_every_refusal_is_audited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, api_keys=FLAT_KEY, api_keys_file=write_keys_file(tmp_path))
    with running_app(settings) as client:
        # upload: predict role (the uploader, the lead, a flat key)
        assert upload(client, "P-roles", header("viewer")) == 403
        assert upload(client, "P-roles", header("officer")) == 403
        assert upload(client, "P-roles", {}) == 401
        assert upload(client, "P-roles", {"X-API-Key": "not-a-key"}) == 401
        assert upload(client, "P-roles", header("uploader")) == 200
        assert upload(client, "P-roles-flat", header("flat")) == 200
        body = client.get("/results/P-roles", headers=header("viewer")).json()
        prediction = body["predictions"][0]
        reads = ["/results/P-roles", "/results/P-roles/chart.png", prediction["original_url"],
                 prediction["male_prediction"]["gradcam_url"]]
        # results, chart, files: read role (the viewer, the lead, a flat key)
        for url in reads:
            for name, expected in (("viewer", 200), ("everything", 200), ("flat", 200), ("uploader", 403),
                                   ("officer", 403)):
                answer = client.get(url, headers=header(name))
                assert answer.status_code == expected, (url, name, answer.status_code)
            assert client.get(url).status_code == 401
        # the audit and erasure: admin role only (never a flat key)
        for name, expected in (("officer", 200), ("everything", 200), ("viewer", 403), ("uploader", 403),
                               ("flat", 403)):
            assert client.get("/audit", headers=header(name)).status_code == expected, name
        for name in ("viewer", "uploader", "flat"):
            refused = client.delete("/patients/P-roles", headers=header(name))
            assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        assert client.delete("/patients/P-roles").status_code == 401
        assert client.get("/results/P-roles", headers=header("viewer")).status_code == 200  # nothing erased
        assert client.delete("/patients/P-roles", headers=header("officer")).json()["predictions_removed"] == 1
        assert client.get("/results/P-roles", headers=header("viewer")).status_code == 404
        responses = [client.get("/metrics"), client.get("/health"), client.get("/openapi.json")]

    rows = audit_rows(settings)
    refusals = [(r["action"], r["key_name"], r["status"]) for r in rows if r["status"] in (401, 403)]
    assert refusals[:4] == [("upload", "viewer", 403), ("upload", "officer", 403), ("upload", None, 401),
                            ("upload", None, 401)]
    assert ("erase", "api-key-1", 403) in refusals and ("erase", None, 401) in refusals
    assert ("audit", "uploader", 403) in refusals and ("file", "officer", 403) in refusals
    erase = [r for r in rows if r["action"] == "erase" and r["status"] == 200]
    assert [(r["key_name"], r["patient_id"]) for r in erase] == [("officer", "P-roles")]
    # No key anywhere: not in the audit, the log, the metrics, the health or the API description.
    secrets = [key for _, key in KEYS.values()] + [FLAT_KEY, "not-a-key"]
    stored = repr(rows)
    for secret in secrets:
        assert secret not in stored and secret not in caplog.text
        assert not [r.url for r in responses if secret in r.text]
    assert "P-roles" not in responses[0].text  # /metrics carries no patient id


def test_without_keys_every_route_is_open_but_erasure_and_the_audit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with running_app(settings) as client:
        assert upload(client, "P-open", {}) == 200
        assert client.get("/results/P-open").status_code == 200
        refused = client.delete("/patients/P-open")
        assert refused.status_code == 403 and "BONEAGE_API_KEYS_FILE" in refused.json()["detail"]
        assert client.get("/audit").status_code == 403
        assert client.get("/results/P-open").status_code == 200
    assert [(r["action"], r["key_name"], r["status"]) for r in audit_rows(settings)] == [
        ("upload", None, 200), ("results", None, 200), ("erase", None, 403), ("audit", None, 403),
        ("results", None, 200)]


def test_a_new_key_from_the_command_line_works_and_its_line_holds_only_the_digest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "ward-3", "read,predict"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].rsplit(" ", 1)[1]
    line = out[-1]
    assert key not in line and line.startswith("ward-3 predict,read sha256:")
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    ring = KeyRing(read_key_file(path))
    found = ring.authenticate(key)
    assert found is not None and found.name == "ward-3" and found.roles == {Role.predict, Role.read}
    assert ring.authenticate(key + "x") is None and ring.authenticate("") is None


@pytest.mark.parametrize(("line", "message"), [
    ("viewer read the-key-itself", "sha256:<64 lowercase hex digits>"),
    ("viewer reader sha256:" + "0" * 64, "unknown role 'reader'"),
    ("viewer read", "expected `name roles sha256:<hex>`"),
    ("view/er read sha256:" + "0" * 64, "expected `name roles sha256:<hex>`"),
])
def test_a_malformed_keys_file_line_is_named_without_its_key(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# a comment\n{line}\n")
    with pytest.raises(KeyFileError) as error:
        read_key_file(path)
    assert f"{path}:2" in str(error.value) and message in str(error.value)
    assert "the-key-itself" not in str(error.value)


def test_a_keys_file_that_cannot_be_read_or_repeats_a_name_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot be read"):
        KeyRing.from_settings(make_settings(tmp_path, api_keys_file=tmp_path / "missing"))
    path = tmp_path / "keys"
    path.write_text(f"api-key-1 admin sha256:{'0' * 64}\n")
    with pytest.raises(KeyFileError, match="unique: api-key-1"):
        KeyRing.from_settings(make_settings(tmp_path, api_keys="flat", api_keys_file=path))
    ring = KeyRing.from_settings(make_settings(tmp_path, api_keys="k1, k2"))
    assert [(k.name, k.roles) for k in ring.keys] == [("api-key-1", FLAT_KEY_ROLES), ("api-key-2", FLAT_KEY_ROLES)]
    assert Role.admin not in FLAT_KEY_ROLES
