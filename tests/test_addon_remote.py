"""The add-on's side of remote servers in real Blender (issue 12 part 6): the preferences warn
before a token would go over plain http beyond this computer, show the certificate settings
for https, and Test Connection reaches an HTTPS server with a self-signed certificate only
when its fingerprint is pinned. Runs on bpy 5.0 and, when present, bpy 4.2 LTS."""
from __future__ import annotations

import ssl
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blender_helpers as helpers  # noqa: E402
from blender_helpers import blender_pythons, run_in_blender  # noqa: E402

pytestmark = pytest.mark.slow


class _Layout:
    """Records what a draw function shows: label texts and property names."""

    def __init__(self, shown: list):
        self.shown = shown

    def label(self, text="", **_kwargs):
        self.shown.append(text)

    def prop(self, _data, name, **_kwargs):
        self.shown.append(f"prop:{name}")

    def operator(self, *_args, **_kwargs):
        return type("Props", (), {})()

    def box(self, *_args, **_kwargs):
        return self

    row = column = split = box


def _report(operator) -> str:
    try:
        return f"ok: {sorted(operator())}"
    except RuntimeError as error:  # an ERROR report, as background Blender raises it
        return f"error: {error}"


def scenario_remote_preferences(url: str, token: str, fingerprint: str) -> dict:
    import bpy

    helpers.reset_blender()
    package = helpers.register_as_extension()
    from multiplane.addon import preferences

    prefs = preferences.get(bpy.context)
    prefs.backend = "REMOTE"
    prefs.server_token = token
    out = {}

    def shown() -> list:
        lines: list = []
        preferences.draw_preferences(prefs, _Layout(lines), bpy.context)
        return lines

    prefs.server_url = "http://192.0.2.7:8765"
    out["plain_remote"] = shown()
    prefs.server_url = "http://127.0.0.1:8765"
    out["plain_loopback"] = shown()
    prefs.server_url = url
    out["https"] = shown()
    out["unpinned"] = _report(bpy.ops.multiplane.test_connection)
    prefs.server_cert_sha256 = "00" * 32
    out["wrong_pin"] = _report(bpy.ops.multiplane.test_connection)
    prefs.server_cert_sha256 = fingerprint
    out["pinned"] = _report(bpy.ops.multiplane.test_connection)
    settings = preferences.backend_settings(bpy.context)
    out["settings_pin"] = settings.cert_sha256
    package.unregister()
    return out


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    from tools.testing import ServerProcess, self_signed_certificate  # not in Blender's Python

    cert, key, fingerprint = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    s = ServerProcess(tmp_path_factory.mktemp("serve") / "stacks", fake_step_seconds=0.0,
                      extra_args=("--tls-cert", str(cert), "--tls-key", str(key)),
                      verify=ssl.create_default_context(cafile=str(cert)))
    # The first /v1/models takes seconds (imports, a look at the weights cache), longer than
    # Test Connection's 3 s timeout on a busy machine; warm it here.
    s.client.get("/v1/models").raise_for_status()
    yield s, fingerprint
    s.stop()


@pytest.mark.parametrize("python", blender_pythons())
def test_remote_preferences_warn_and_pin_certificates(python, tls_server):
    server, fingerprint = tls_server
    out = run_in_blender(__file__, "scenario_remote_preferences", python=python, url=server.url,
                         token=server.token, fingerprint=fingerprint)
    assert any("plain http" in line for line in out["plain_remote"]), out["plain_remote"]
    assert not any("plain http" in line for line in out["plain_loopback"] + out["https"])
    assert "prop:server_cert_sha256" in out["https"] and "prop:server_ca_file" in out["https"]
    assert "prop:server_cert_sha256" not in out["plain_remote"]
    assert out["unpinned"].startswith("error:") and "does not trust" in out["unpinned"], out["unpinned"]
    assert out["wrong_pin"].startswith("error:") and "not the pinned one" in out["wrong_pin"], out["wrong_pin"]
    assert out["pinned"] == "ok: ['FINISHED']", out["pinned"]
    assert out["settings_pin"] == fingerprint
