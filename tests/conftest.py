"""Fixtures shared by the test files: random checkpoints, a generator over each variant, Cog's
real server on the tiny random checkpoint; and the `server` / `parity` markers, set by folder.

A random checkpoint (tools/checkpoints.py) is written once per test run and per
variant; each test module loads its own `Generator` from it, so a module's engine state (reserved
slots, cache sizes) never reaches another module.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.scheduler import BatchScheduler
from tools.checkpoints import make_checkpoint
from tools.testing.cog_server import CogServer, cog_server

TESTS_ROOT = Path(__file__).resolve().parent
REPO_ROOT = TESTS_ROOT.parent
# A test in one of these folders gets the marker of the same name; a test using the `cog_predictor`
# fixture is a server test wherever it lives. The fast run: -m "not server and not parity and not slow".
MARKED_FOLDERS = ("server", "parity")
# Fixtures whose users are integration runs of minutes: marked `slow` (the GPU check's dry run, about
# 8 minutes on 2 CPU cores, starts Cog's server and runs the parity tests itself).
SLOW_FIXTURES = ("dry_run",)

VARIANTS = ("tiny", "small", "base")
RANDOM_CHECKPOINT_SEED = 7


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder of a random checkpoint of a variant (seed 7), written on first use."""
    written: dict[str, Path] = {}

    def folder(variant: str) -> Path:
        if variant not in written:
            written[variant] = make_checkpoint(tmp_path_factory.mktemp(f"random-{variant}"),
                                               variant=variant, seed=RANDOM_CHECKPOINT_SEED)
        return written[variant]

    return folder


@pytest.fixture(autouse=True)
def package_logger_as_found() -> Iterator[None]:
    """``Service.start`` prints the engine's log records on stdout (for Cog's log); after a test
    that starts one, no later test finds those lines in the stdout it reads."""
    logger = logging.getLogger("deepseek_vl2")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="module", params=VARIANTS)
def generator(request: pytest.FixtureRequest, random_checkpoint: Callable[[str], Path]) -> Generator:
    """A float32 CPU generator over each variant's random checkpoint.

    A test that needs one variant only narrows it:
    ``@pytest.mark.parametrize("generator", ["tiny"], indirect=True)``."""
    return Generator.load(random_checkpoint(request.param), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def cog_predictor(random_checkpoint: Callable[[str], Path]) -> Iterator[CogServer]:
    """Cog's real HTTP server on the predictor cog.yaml names, over the tiny random checkpoint.

    It retries while the server answers 409: coglet can still report a slot busy for a moment
    after a prediction ended (docs/cog.md); a client retries too."""
    config = yaml.safe_load((REPO_ROOT / "cog.yaml").read_text(encoding="utf-8"))
    with cog_server(config.get("run") or config["predict"], weights=random_checkpoint("tiny"),
                    retry_busy=10) as running:
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests/server/ and tests/parity/ tests by folder, users of `cog_predictor` `server`,
    users of a SLOW_FIXTURES fixture `slow`."""
    for item in items:
        folder = Path(str(item.path)).resolve().relative_to(TESTS_ROOT).parts[0]
        if folder in MARKED_FOLDERS:
            item.add_marker(folder)
        if "cog_predictor" in getattr(item, "fixturenames", ()):
            item.add_marker("server")
        if any(name in SLOW_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker("slow")


@pytest.fixture
def scheduler(generator: Generator) -> Iterator[BatchScheduler]:
    """The scheduler running ``generator``'s requests (as many slots as its decode state), closed after the test."""
    with BatchScheduler(generator) as running:
        yield running
