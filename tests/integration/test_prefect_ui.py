"""The UI `tunepipe up --port N` starts reaches its own API, and a stage summary's plots travel with
its markdown artifact (the evaluate summary's relative image links were broken images in the UI)."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.request

import pytest

from tunepipe.tasks.core.net import free_port

from tunepipe.tasks.ops.prefect_server import LocalStack

pytestmark = pytest.mark.prefect


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as response:
        return response.status, response.read()


def test_ui_on_another_port_reaches_its_api_and_artifact_plots_load(tmp_path):
    from PIL import Image
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tunepipe.schemas.manifest import ArtifactRef
    from tunepipe.tasks.core.prefect_stage import publish_stage_artifacts

    stack = LocalStack(prefect_home=tmp_path / "home", port=free_port(), log_dir=tmp_path / "logs")
    assert stack.port != 4200
    try:
        stack.start_server(timeout=150)
        status, settings = get(f"{stack.ui_url}/ui-settings")  # what the UI's browser code asks first
        api_url = json.loads(settings)["api_url"]
        assert status == 200 and api_url == stack.url
        assert get(f"{api_url}/health")[0] == 200  # the API the UI will call answers there
        status, page = get(stack.ui_url)
        assert status == 200 and b"<html" in page.lower()

        # A stage summary with a plot next to it, as evaluate writes it (report.md: `![ab](ab.png)`).
        art = tmp_path / "evaluate" / "k1"
        art.mkdir(parents=True)
        buffer = io.BytesIO()
        Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, format="PNG")
        (art / "ab.png").write_bytes(buffer.getvalue())
        (art / "summary.md").write_text("# Evaluation\n\n## Plots\n\n![ab](ab.png)\n![gone](missing.png)\n")
        ref = ArtifactRef(stage="evaluate", key="k1", path=str(art))

        @flow(name="ui-artifact")
        def publish():
            publish_stage_artifacts(ref)

        with temporary_settings(updates={PREFECT_API_URL: stack.url}):
            publish()
            with get_client(sync_client=True) as client:
                artifact = next(a for a in client.read_artifacts() if a.key == "evaluate-summary")
        images = re.findall(r"!\[ab\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifact.data)
        assert len(images) == 1 and base64.b64decode(images[0]) == buffer.getvalue()
        with Image.open(io.BytesIO(base64.b64decode(images[0]))) as shown:
            assert shown.size == (8, 6)
        assert "![gone](missing.png)" in artifact.data  # not a file of the artifact: left as written
    finally:
        stack.stop()
