"""Discovery and loading of the reference fixtures produced by the official implementation.

The fixture directory comes from the environment variable DSVL2_REFERENCE_DIR, defaulting to
``<repo>/../shared/fixtures/reference``. Configs (subdirectories of ``checkpoints/``) and cases
(``processor/*.json``) are found by scanning that directory, so another fixture set with other
cases or configs is picked up without code changes.

Typical use in a test module::

    from tools.parity.reference_data import case_params, config_case_params, load_case_inputs

    @pytest.mark.parametrize("config, case", config_case_params())
    def test_something(config, case): ...

When the directory is absent the ``*_params`` helpers return one parameter set marked skip, with a
reason that names DSVL2_REFERENCE_DIR.

pytest is imported only by the pytest helpers (``requires_reference`` and the ``*_params``
functions), so scripts that use the discovery and loading functions (the GPU check, the bf16
drift script) run where pytest is not installed.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ENV_VAR = "DSVL2_REFERENCE_DIR"
DEVICE_ENV_VAR = "DSVL2_TEST_DEVICE"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "reference"


# ------------------------------------------------------------------------- discovery


def reference_dir() -> Path:
    """The fixture directory: $DSVL2_REFERENCE_DIR or <repo>/../shared/fixtures/reference."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured).expanduser() if configured else DEFAULT_REFERENCE_DIR


def reference_available(root: Optional[Path] = None) -> bool:
    """True when the fixture directory (default: :func:`reference_dir`) holds both checkpoints/
    and processor/."""
    root = reference_dir() if root is None else root
    return (root / "checkpoints").is_dir() and (root / "processor").is_dir()


def skip_reason() -> str:
    """Why reference tests are skipped (names the environment variable to set)."""
    return (
        f"reference fixtures not found at {reference_dir()}; set {ENV_VAR} to the directory "
        "holding checkpoints/, processor/ and outputs/"
    )


def __getattr__(name: str) -> Any:
    """``requires_reference``: a pytest skip mark (made on first use, so that importing this module
    needs no pytest)."""
    if name == "requires_reference":
        import pytest

        return pytest.mark.skipif(not reference_available(), reason=skip_reason())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_names() -> list[str]:
    """Config names: the subdirectories of checkpoints/, sorted."""
    if not reference_available():
        return []
    return sorted(p.name for p in (reference_dir() / "checkpoints").iterdir() if p.is_dir())


def case_names() -> list[str]:
    """Case names: the stems of processor/*.json, sorted."""
    if not reference_available():
        return []
    return sorted(p.stem for p in (reference_dir() / "processor").glob("*.json"))


def checkpoint_dir(config: str) -> Path:
    """The HF-style checkpoint folder of a config."""
    path = reference_dir() / "checkpoints" / config
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {path}")
    return path


def has_outputs(config: str, case: str) -> bool:
    """Whether outputs/<config>/<case>.safetensors and .json both exist."""
    base = reference_dir() / "outputs" / config / case
    return base.with_suffix(".safetensors").is_file() and base.with_suffix(".json").is_file()


def test_device() -> torch.device:
    """The device the reference-parity tests run the model on: $DSVL2_TEST_DEVICE, default cpu.

    Raises RuntimeError when it names CUDA on a machine without a usable GPU (a GPU check must
    not pass by running on the CPU).
    """
    device = torch.device(os.environ.get(DEVICE_ENV_VAR, "cpu") or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV_VAR}={device} but torch.cuda.is_available() is False")
    return device


test_device.__test__ = False  # a helper, not a pytest test


# ------------------------------------------------------------------------- pytest parameters


def _unavailable_param(n_args: int) -> list[Any]:
    import pytest

    values = (None,) * n_args
    return [pytest.param(*values, id="no-reference", marks=pytest.mark.skip(reason=skip_reason()))]


def config_params() -> list[Any]:
    """pytest parameters over configs (ids = config names)."""
    import pytest

    if not reference_available():
        return _unavailable_param(1)
    return [pytest.param(config, id=config) for config in config_names()]


def case_params() -> list[Any]:
    """pytest parameters over processor cases (ids = case names)."""
    import pytest

    if not reference_available():
        return _unavailable_param(1)
    return [pytest.param(case, id=case) for case in case_names()]


def config_case_params(require_outputs: bool = False) -> list[Any]:
    """pytest parameters over (config, case) pairs, ids "config-case".

    With `require_outputs`, a pair whose outputs/<config>/<case> files are missing is kept but
    marked skip (so a gap in the fixture set is visible, not silently dropped).
    """
    import pytest

    if not reference_available():
        return _unavailable_param(2)
    params = []
    for config in config_names():
        for case in case_names():
            marks = ()
            if require_outputs and not has_outputs(config, case):
                reason = f"no outputs/{config}/{case}.* in {reference_dir()}"
                marks = (pytest.mark.skip(reason=reason),)
            params.append(pytest.param(config, case, id=f"{config}-{case}", marks=marks))
    return params


# ------------------------------------------------------------------------- loaders


@functools.lru_cache(maxsize=None)
def _case_meta_cached(root: str, case: str) -> dict[str, Any]:
    return json.loads((Path(root) / "processor" / f"{case}.json").read_text(encoding="utf-8"))


def case_meta(case: str) -> dict[str, Any]:
    """processor/<case>.json (a fresh copy: callers may modify it)."""
    return copy.deepcopy(_case_meta_cached(str(reference_dir()), case))


def case_image_files(case: str) -> list[str]:
    """Image file names of a case in `<image>` order (message `images` entries, in turn order)."""
    meta = case_meta(case)
    from_messages = [name for m in meta["conversation"] for name in m.get("images", [])]
    return from_messages or list(meta.get("image_files", []))


def load_case_inputs(case: str) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The case's conversation (as stored) and its images, opened with PIL and converted to RGB."""
    meta = case_meta(case)
    images = []
    for name in case_image_files(case):
        with Image.open(reference_dir() / "inputs" / name) as image:
            images.append(image.convert("RGB"))
    return meta["conversation"], images


def expected_processor_tensors(case: str) -> dict[str, torch.Tensor]:
    """processor/<case>.safetensors: input_ids, attention_mask, images_seq_mask, images_spatial_crop."""
    return load_file(str(reference_dir() / "processor" / f"{case}.safetensors"))


def expected_tiles(case: str) -> torch.Tensor:
    """The reference image tensor [n_tiles, 3, S, S] float32, rebuilt from the PNG tiles.

    Each value is (u8 / 255 - 0.5) / 0.5 in float32, exactly as the fixtures README states. A case
    without images has no PNGs: the reference tensor is then all zeros of `images_shape`.
    """
    meta = case_meta(case)
    files = meta.get("tile_png_files") or []
    if not files:
        return torch.zeros(tuple(meta["images_shape"][1:]), dtype=torch.float32)
    tiles = []
    for name in files:
        with Image.open(reference_dir() / name) as png:
            tiles.append(torch.from_numpy(np.array(png.convert("RGB"))).permute(2, 0, 1))
    u8 = torch.stack(tiles)
    return (u8.to(torch.float32).div(255) - 0.5) / 0.5


def expected_outputs(config: str, case: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """outputs/<config>/<case>.safetensors (tensors) and .json (generation metadata)."""
    base = reference_dir() / "outputs" / config / case
    tensors = load_file(str(base.with_suffix(".safetensors")))
    meta = json.loads(base.with_suffix(".json").read_text(encoding="utf-8"))
    return tensors, meta
