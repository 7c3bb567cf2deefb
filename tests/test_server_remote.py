"""Remote GPUs that actually connect (issue 12 part 6), on loopback: Host names given with
--allow-host (or the environment) answered and others refused, HTTPS with a self-signed
certificate end to end, the add-on's client included (trusted only when pinned), and the
add-on's warning before a token crosses a network in clear."""
from __future__ import annotations

import hashlib
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from addon.client import ServerClient, ServerError, normalize_fingerprint, plain_http_warning
from tools.testing import REPO, ServerProcess, self_signed_certificate

pytestmark = pytest.mark.slow


def host_header(server, name: str) -> int:
    return server.client.get("/v1/jobs", headers={"Host": name}).status_code


def test_allowed_host_names_are_answered_and_others_refused(tmp_path):
    s = ServerProcess(tmp_path / "stacks", fake_step_seconds=0.0,
                      extra_args=("--allow-host", "gpu.lan", "--allow-host", "127.0.0.1:9000"),
                      env={"MULTIPLANE_ALLOW_HOSTS": "render.example.com, other.example.com"})
    try:
        port = s.url.rsplit(":", 1)[1]
        for name in ("gpu.lan", f"gpu.lan:{port}", "GPU.LAN", "127.0.0.1:9000",  # tunnel's local end
                     "render.example.com", f"other.example.com:{port}", f"localhost:{port}"):
            assert host_header(s, name) == 200, name
        for name in ("evil.example", f"evil.example:{port}", "gpu.lan:1", "127.0.0.1:9001",
                     "gpu.lan.evil.example", f"example.com:{port}"):
            assert host_header(s, name) == 421, name
        r = s.client.get("/v1/health", headers={"Host": "evil.example"})
        assert "--allow-host" in r.json()["detail"]
    finally:
        s.stop()


def test_a_malformed_allowed_host_is_a_one_line_start_up_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.fake_server", "--port", "0",
                           "--output-root", str(tmp_path / "stacks"), "--allow-host", "http://gpu.lan/"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "allow_host" in proc.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path, str]:
    cert, key, fingerprint = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert normalize_fingerprint(fingerprint) == hashlib.sha256(der).hexdigest()
    return cert, key, fingerprint


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certificate):
    cert, key, _ = certificate
    s = ServerProcess(tmp_path_factory.mktemp("tls-serve") / "stacks", fake_step_seconds=0.0,
                      extra_args=("--tls-cert", str(cert), "--tls-key", str(key)),
                      verify=ssl.create_default_context(cafile=str(cert)))
    yield s
    s.stop()


def test_https_with_a_self_signed_certificate_end_to_end(tls_server, tmp_path, certificate):
    _, _, fingerprint = certificate
    assert tls_server.ready["url"].startswith("https://127.0.0.1:")
    client = ServerClient(tls_server.url, tls_server.token, cert_sha256=fingerprint)
    assert client.warning is None
    assert client.health()["status"] == "ok"
    client.check_token()
    job = client.submit({"prompt": "a lake over TLS", "model": "tiny", "width": 256, "height": 256,
                         "steps": 1, "tta_passes": 1})
    done = tls_server.wait(job["id"])
    assert done["status"] == "succeeded"
    for name in done["stack"]["files"]:
        path = client.download_file(job["id"], name, tmp_path / name)
        assert path.read_bytes() == tls_server.client.get(f"/v1/jobs/{job['id']}/files/{name}").content
    with pytest.raises(ServerError, match="refused the token"):
        ServerClient(tls_server.url, "wrong-token-0123456789", cert_sha256=fingerprint).check_token()


def test_a_self_signed_certificate_is_trusted_only_when_pinned(tls_server, certificate):
    cert, _, fingerprint = certificate
    with pytest.raises(ServerError, match="does not trust.*fingerprint") as caught:
        ServerClient(tls_server.url, tls_server.token).health()
    assert caught.value.unreachable
    wrong = "00" * 32
    with pytest.raises(ServerError, match="not the pinned one"):
        ServerClient(tls_server.url, tls_server.token, cert_sha256=wrong).health()
    with pytest.raises(ServerError, match="64 hex digits"):
        ServerClient(tls_server.url, tls_server.token, cert_sha256="abc")
    # the certificate itself as the CA file: verified the usual way, host name included
    assert ServerClient(tls_server.url, tls_server.token, ca_file=str(cert)).health()["status"] == "ok"
    # plain http to the https port is no answer at all
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https:", "http:") + "/v1/health", timeout=5)


def test_bad_tls_files_are_one_line_start_up_errors(tmp_path, certificate):
    cert, key, _ = certificate
    for args in (("--tls-cert", str(cert)), ("--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(key)),
                 ("--tls-cert", str(key), "--tls-key", str(cert))):
        proc = subprocess.run([sys.executable, "-m", "tools.fake_server", "--port", "0",
                               "--output-root", str(tmp_path / "stacks"), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "tls" in proc.stderr, proc.stderr


def test_the_add_on_warns_before_a_token_crosses_a_network_in_clear():
    assert "plain http" in plain_http_warning("http://192.168.1.20:8765", "a-token-0123456789")
    assert "SSH tunnel" in ServerClient("http://gpu.lan:8765", "a-token-0123456789").warning
    for quiet in (("http://127.0.0.1:8765", "t"), ("http://localhost:8765", "t"), ("http://[::1]:8765", "t"),
                  ("https://gpu.lan:8765", "t"), ("http://gpu.lan:8765", "")):
        assert plain_http_warning(*quiet) is None, quiet
