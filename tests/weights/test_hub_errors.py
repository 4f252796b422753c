"""The Hub download gives its one clear message whichever HTTP library huggingface_hub uses:
requests (0.x, our pin) or httpx (1.x). Each library's real exception classes are raised where
that library is installed; a missing library skips its cases with the reason."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest

from deepseek_vl2.weights.fetch import network_errors
from deepseek_vl2.weights.resolve import DownloadError, download

CLOSED_HUB = "http://127.0.0.1:9"


def _library(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed here: its exception classes cannot be raised")


def _connection_errors(library: str) -> list[BaseException]:
    """What each library raises when the Hub does not answer (connect refused, timeout)."""
    module = _library(library)
    if library == "requests":
        return [module.ConnectionError("refused"), module.Timeout("timed out"), module.exceptions.SSLError("bad")]
    return [module.ConnectError("refused"), module.ConnectTimeout("timed out"), module.ReadTimeout("timed out")]


def _raise(error: BaseException):
    def failing(*args, **kwargs):
        raise error
    return failing


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_unreachable_hub_before_the_download_is_one_message(library: str, tmp_path: Path, monkeypatch) -> None:
    for error in _connection_errors(library):
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _raise(error))
        with pytest.raises(DownloadError, match="could not be reached") as info:
            download("tiny", tmp_path, endpoint=CLOSED_HUB)
        assert type(error).__name__ in str(info.value) and info.value.__cause__ is error


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_connection_lost_during_the_download_is_one_message(library: str, tmp_path: Path, monkeypatch) -> None:
    listing = types.SimpleNamespace(siblings=[])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *args, **kwargs: listing)
    for error in _connection_errors(library):
        monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(error))
        with pytest.raises(DownloadError, match="during the download.*run again to resume"):
            download("tiny", tmp_path, endpoint=CLOSED_HUB)


def test_an_unrelated_error_is_not_taken_for_the_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", _raise(KeyError("siblings")))
    with pytest.raises(KeyError):
        download("tiny", tmp_path, endpoint=CLOSED_HUB)


def test_network_errors_import_no_http_library(monkeypatch) -> None:
    """Only libraries already loaded are consulted: an absent one is neither needed nor imported."""
    for name in ("requests", "httpx"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert network_errors() == (OSError,)
    assert "requests" not in sys.modules and "httpx" not in sys.modules
