"""Checkpoint downloads that read well in a log: a tarball over http(s), resumed when cut off.

``COG_WEIGHTS=https://host/deepseek-vl2-tiny.tar`` (or ``.tar.gz``): the archive holds the
checkpoint's files at its top level or inside one folder. It is downloaded next to the
destination (``pget`` when it is on PATH and nothing was downloaded yet, else Python with HTTP
range requests that resume a partial file after a dropped connection or a restart), checked
(its size, and its SHA-256 when the URL ends with ``#sha256=<hex>``), extracted, and the
archive deleted. Progress is one line every few seconds: bytes, rate and time left.
:func:`network_errors` names what a failed connection raises through huggingface_hub, whichever
HTTP library its version uses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

# The base class of the errors each HTTP library raises when no answer came (module, attribute).
# requests' (huggingface_hub 0.x) derive from OSError already; httpx's (1.x) do not.
_HTTP_LIBRARY_ERRORS = (("requests", "RequestException"), ("httpx", "RequestError"))

PROGRESS_SECONDS = float(os.environ.get("DSVL2_PROGRESS_SECONDS", "5"))
CHUNK = 1 << 20
RETRIES = 5
TIMEOUT = 30.0
COMPLETE_MARKER = ".complete"


class FetchError(RuntimeError):
    """The checkpoint could not be fetched; the message says why and what to do."""


def network_errors() -> tuple[type[BaseException], ...]:
    """The exception classes of a failed connection: OSError, and the request-error base class of
    requests and of httpx where that library is already loaded (no library is imported here: one
    that raised is loaded). Call it in the ``except`` clause, where it is evaluated as the error
    arrives."""
    found: list[type[BaseException]] = [OSError]
    for module_name, class_name in _HTTP_LIBRARY_ERRORS:
        module = sys.modules.get(module_name)
        error_class = getattr(module, class_name, None) if module is not None else None
        if isinstance(error_class, type) and issubclass(error_class, BaseException):
            found.append(error_class)
    return tuple(found)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class ProgressLog:
    """Prints ``label: done / total (pct), rate, ETA`` at most every ``interval`` seconds."""

    def __init__(self, label: str, total: Optional[int], interval: float = PROGRESS_SECONDS,
                 start: int = 0) -> None:
        self.label, self.total, self.interval = label, total, interval
        self.started, self.start_bytes = time.monotonic(), start
        self.last_print = self.started

    def line(self, done: int) -> str:
        """The progress line for ``done`` bytes."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (done - self.start_bytes) / elapsed
        text = f"{self.label}: {_size(done)}"
        if self.total:
            text += f" of {_size(self.total)} ({100 * done / self.total:.0f}%)"
        text += f", {_size(rate)}/s"
        if self.total and rate > 0 and done < self.total:
            text += f", about {(self.total - done) / rate:.0f} s left"
        return text

    def update(self, done: int, force: bool = False) -> None:
        """Print a line if ``interval`` seconds passed since the last one (or ``force``)."""
        now = time.monotonic()
        if force or now - self.last_print >= self.interval:
            self.last_print = now
            print(self.line(done), flush=True)


def watch(label: str, total: Optional[int], measure: Callable[[], int]) -> Callable[[], None]:
    """Print progress of ``measure()`` bytes from a thread until the returned stop() is called."""
    progress = ProgressLog(label, total)
    stopped = threading.Event()

    def loop() -> None:
        while not stopped.wait(min(progress.interval, 1.0)):
            progress.update(measure())

    thread = threading.Thread(target=loop, daemon=True, name="dsvl2-progress")
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)
        progress.update(measure(), force=True)

    return stop


def _remote_total(response) -> Optional[int]:
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def download_file(url: str, dest: Path, retries: int = RETRIES) -> int:
    """Download ``url`` into ``dest``, resuming what ``dest`` already holds; returns its size.

    A dropped connection is retried ``retries`` times, each time from where it stopped.
    Raises FetchError when the server cannot be reached or keeps failing.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    total: Optional[int] = None
    progress: Optional[ProgressLog] = None
    last_error: Optional[BaseException] = None
    for attempt in range(retries + 1):
        have = dest.stat().st_size if dest.exists() else 0
        if total is not None and have >= total:
            break
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
                if have and response.status != 206:  # the server ignores ranges: start over
                    have = 0
                total = _remote_total(response) or total  # 206: Content-Range; 200: length
                if progress is None:
                    progress = ProgressLog(f"downloading {url}", total, start=have)
                    if have:
                        print(f"resuming {dest.name} at {_size(have)}", flush=True)
                with open(dest, "ab" if have else "wb") as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        have += len(chunk)
                        progress.update(have)
            if total is None or have >= total:
                break
            last_error = ConnectionError(f"connection closed at {have} of {total} bytes")
        except urllib.error.HTTPError as error:
            if error.code == 416 and total is None:  # the partial file is already complete
                break
            raise FetchError(f"could not download {url}: HTTP {error.code} {error.reason}") from error
        except (urllib.error.URLError, OSError, ValueError) as error:
            last_error = error
            if not have and attempt == 0 and isinstance(error, urllib.error.URLError):
                break  # nothing answered at all: no point retrying
        if attempt < retries:
            print(f"download interrupted ({type(last_error).__name__}: {last_error}); "
                  f"resuming (retry {attempt + 1} of {retries})", flush=True)
            time.sleep(min(2.0**attempt * 0.5, 10.0))
    size = dest.stat().st_size if dest.exists() else 0
    if total is not None and size != total or size == 0:
        reason = getattr(last_error, "reason", last_error)
        raise FetchError(
            f"could not download {url} ({type(last_error).__name__}: {reason}); "
            f"{_size(size)} of {_size(total) if total else 'an unknown size'} kept in {dest} "
            "for the next try. Check the URL and the network, or point COG_WEIGHTS at a local "
            "checkpoint directory"
        )
    if progress is not None:
        progress.update(size, force=True)
    return size


def _pget(url: str, dest: Path) -> bool:
    """Download with pget (parallel ranges) when on PATH; False when it is absent or fails."""
    pget = shutil.which("pget")
    if pget is None:
        return False
    print(f"downloading {url} with {pget}", flush=True)
    stop = watch(f"downloading {url}", None, lambda: dest.stat().st_size if dest.exists() else 0)
    try:
        result = subprocess.run([pget, "--force", url, str(dest)], capture_output=True, text=True)
    finally:
        stop()
    if result.returncode != 0:
        print(f"pget failed ({result.stderr.strip()[-300:]}); downloading with Python", flush=True)
        dest.unlink(missing_ok=True)
        return False
    return True


def _verify(archive: Path, url: str) -> None:
    expected = url.partition("#sha256=")[2].strip().lower()
    if not expected:
        return
    digest = hashlib.sha256()
    with open(archive, "rb") as data:
        while chunk := data.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        archive.unlink(missing_ok=True)
        raise FetchError(f"{url}: SHA-256 {digest.hexdigest()} differs from {expected}; "
                         "the download was deleted")


def _checkpoint_root(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise FetchError("the archive holds no config.json at its top level or in one folder: "
                     "it is not a DeepSeek-VL2 checkpoint")


def fetch_checkpoint(url: str, root: Path) -> Path:
    """The checkpoint directory for ``url``: downloaded and extracted under ``root`` once."""
    download_url = url.partition("#")[0]
    key = hashlib.sha256(download_url.encode()).hexdigest()[:16]
    final = root / f"url-{key}"
    if (final / COMPLETE_MARKER).is_file():
        print(f"using {final} (downloaded earlier from {download_url})", flush=True)
        return final
    archive = root / f"url-{key}.download"
    if archive.exists() or not _pget(download_url, archive):
        download_file(download_url, archive)
    _verify(archive, url)
    staging = root / f"url-{key}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"extracting {_size(archive.stat().st_size)} into {final}", flush=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        archive.unlink(missing_ok=True)
        raise FetchError(f"{download_url} is not a readable .tar or .tar.gz ({error}); the download "
                         "was deleted") from error
    checkpoint = _checkpoint_root(staging)
    shutil.rmtree(final, ignore_errors=True)
    checkpoint.rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    (final / COMPLETE_MARKER).write_text(download_url + "\n", encoding="utf-8")
    archive.unlink(missing_ok=True)
    return final
