"""COG_WEIGHTS as an http(s) URL of a checkpoint tarball: downloaded with log-friendly progress,
resumed after a dropped connection (in the same setup and on the next start), verified,
extracted and loaded, through Cog's real server too. A local HTTP server in the test plays the
weights host; it can cut the first transfer short and records the Range headers it receives."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tools.testing.cog_server import cog_server, data_uri
from deepseek_vl2 import weights
from deepseek_vl2.weights import fetch
from tools.checkpoints import make_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


class _Host(http.server.ThreadingHTTPServer):
    payload: bytes = b""
    cut_after: int | None = None  # bytes sent before the first transfer is dropped
    ranges: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Host

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        data, start = self.server.payload, 0
        wanted = self.headers.get("Range")
        self.server.ranges.append(wanted or "")
        if wanted:
            start = int(wanted.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut_after is not None:
            cut, self.server.cut_after = self.server.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-transfer
            return
        self.wfile.write(body)


@contextlib.contextmanager
def weights_host(payload: bytes, cut_after: int | None = None) -> Iterator[_Host]:
    host = _Host(("127.0.0.1", 0), _Handler)
    host.payload, host.cut_after, host.ranges = payload, cut_after, []
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        host.shutdown()
        host.server_close()


def url_of(host: _Host, name: str = "ckpt.tar.gz") -> str:
    return f"http://127.0.0.1:{host.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> bytes:
    """A tiny random checkpoint as a .tar.gz holding one folder (the way people tar a folder)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "deepseek-vl2-test", variant="tiny", seed=3)
    archive = tmp_path_factory.mktemp("tar") / "ckpt.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive.read_bytes()


def test_tarball_url_is_downloaded_verified_and_extracted(tmp_path: Path, tarball: bytes, capsys) -> None:
    digest = hashlib.sha256(tarball).hexdigest()
    with weights_host(tarball) as host:
        path = fetch.fetch_checkpoint(f"{url_of(host)}#sha256={digest}", tmp_path)
        assert weights.missing_checkpoint_files(path) == []
        assert fetch.fetch_checkpoint(f"{url_of(host)}#sha256={digest}", tmp_path) == path
        assert len(host.ranges) == 1  # the second call found it complete
    log = capsys.readouterr().out
    assert "downloading http://127.0.0.1" in log and "100%" in log and "/s" in log
    assert not list(tmp_path.glob("*.download"))  # the archive is deleted after extraction


def test_wrong_checksum_is_refused(tmp_path: Path, tarball: bytes) -> None:
    with weights_host(tarball) as host:
        with pytest.raises(fetch.FetchError, match="SHA-256"):
            fetch.fetch_checkpoint(f"{url_of(host)}#sha256={'0' * 64}", tmp_path)


def test_dropped_connection_resumes_in_the_same_call(tmp_path: Path, tarball: bytes, capsys) -> None:
    with weights_host(tarball, cut_after=len(tarball) // 3) as host:
        path = fetch.fetch_checkpoint(url_of(host), tmp_path)
    assert weights.missing_checkpoint_files(path) == []
    assert host.ranges[0] == "" and host.ranges[1] == f"bytes={len(tarball) // 3}-"
    assert "resuming" in capsys.readouterr().out


def test_partial_download_is_resumed_on_the_next_start(tmp_path: Path, tarball: bytes) -> None:
    """A first start that cannot finish keeps what it got; the next one asks only for the rest."""
    with weights_host(tarball, cut_after=len(tarball) // 2) as host:
        with pytest.raises(fetch.FetchError, match="kept in"):
            fetch.download_file(url_of(host), tmp_path / "part", retries=0)
    assert (tmp_path / "part").stat().st_size == len(tarball) // 2
    with weights_host(tarball) as host:
        assert fetch.download_file(url_of(host), tmp_path / "part") == len(tarball)
    assert host.ranges == [f"bytes={len(tarball) // 2}-"]
    assert (tmp_path / "part").read_bytes() == tarball


def test_unreachable_url_is_one_clear_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSVL2_DOWNLOAD_DIR", str(tmp_path))
    (tmp_path / "url-leftover").mkdir()  # the destination already holds something
    with pytest.raises(weights.DownloadError) as error:
        weights.resolve_checkpoint("http://127.0.0.1:9/ckpt.tar")
    message = str(error.value)
    assert "could not download http://127.0.0.1:9/ckpt.tar" in message
    assert "COG_WEIGHTS" in message and "lacks" not in message


def test_not_a_checkpoint_tarball_is_refused(tmp_path: Path, tmp_path_factory) -> None:
    archive = tmp_path_factory.mktemp("bad") / "x.tar"
    with tarfile.open(archive, "w") as tar:
        readme = tmp_path_factory.mktemp("f") / "README.md"
        readme.write_text("hello")
        tar.add(readme, arcname="README.md")
    with weights_host(archive.read_bytes()) as host:
        with pytest.raises(fetch.FetchError, match="no config.json"):
            fetch.fetch_checkpoint(url_of(host, "x.tar"), tmp_path)


def test_progress_lines_read_well_in_a_log() -> None:
    progress = fetch.ProgressLog("downloading x", total=10_000_000_000, interval=0)
    line = progress.line(2_500_000_000)
    assert line.startswith("downloading x: 2.5 GB of 10.0 GB (25%), ") and "/s" in line
    assert "\r" not in line and "s left" in line


@pytest.mark.server  # starts Cog's real server
def test_cog_server_loads_weights_from_a_tarball_url(tmp_path: Path, tarball: bytes) -> None:
    """Through Cog's real server: COG_WEIGHTS is the URL; the first transfer is cut short."""
    with weights_host(tarball, cut_after=len(tarball) // 4) as host:
        env = {"DSVL2_DOWNLOAD_DIR": str(tmp_path), "DSVL2_PROGRESS_SECONDS": "0.2"}
        with cog_server("predict.py:Predictor", weights=url_of(host), env=env) as server:
            image = data_uri(REPO_ROOT / "demo.png")
            status, body = server.predict({"image": image, "prompt": "What is this?",
                                           "max_length_tokens": 4, "temperature": 0})
            log = server.log()
    assert status == 200 and body["status"] == "succeeded", body
    assert len(body["output"]) >= 1
    assert "resuming" in log and f"bytes={len(tarball) // 4}-" in host.ranges
    assert "downloading http://127.0.0.1" in log and "extracting" in log


@pytest.mark.slow  # runs scripts/serve.sh in a process of its own
def test_serve_sh_refuses_an_unasked_download() -> None:
    """`scripts/serve.sh` with no COG_WEIGHTS, an empty weights/ and no DSVL2_VARIANT stops
    before starting a server, saying what it could download and how large."""
    import os
    import subprocess
    import sys

    if not weights.missing_checkpoint_files(weights.DEFAULT_WEIGHTS_DIR):
        pytest.skip("weights/ holds a checkpoint here: serve.sh would start a server")
    env = {k: v for k, v in os.environ.items() if k not in ("COG_WEIGHTS", "DSVL2_VARIANT")}
    env["VENV"] = str(Path(sys.executable).parent.parent)
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "serve.sh")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "DSVL2_VARIANT=tiny|small|base" in result.stderr and "about 55 GB" in result.stderr
    assert "serving predict.py" not in result.stderr
