"""``--auth``: with a users file, the app answers nothing but its login until a user logs in."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import Client

from app_testing import AppProcess


def test_auth_file_protects_the_app(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# who may log in\nann:s3cret\n")
    runs = tmp_path / "runs"
    (runs / "_datasets" / "d").mkdir(parents=True)
    (runs / "_datasets" / "d" / "a.txt").write_text("private caption")
    app = AppProcess.start(runs, tmp_path / "models", extra_args=["--auth", str(users)])
    try:
        assert httpx.get(f"{app.url}gradio_api/info").status_code == 401
        r = httpx.get(f"{app.url}gradio_api/file={runs / '_datasets' / 'd' / 'a.txt'}")
        assert r.status_code in (401, 403) and "private caption" not in r.text
        with pytest.raises(ValueError, match="Could not login"):  # gradio_client's answer to a refused login
            Client(app.url, auth=("ann", "wrong"), verbose=False)
        client = Client(app.url, auth=("ann", "s3cret"), verbose=False)
        assert "/start_training" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        app.stop()
