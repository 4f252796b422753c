"""Fixtures shared by the test files: random checkpoints and a generator over each variant.

A random checkpoint (scripts/make_test_checkpoint.py) is written once per test run and per
variant; each test module loads its own `Generator` from it, so a module's engine state (reserved
slots, cache sizes) never reaches another module.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from deepseek_vl2.engine.generation import Generator
from deepseek_vl2.engine.scheduler import BatchScheduler
from scripts.make_test_checkpoint import make_checkpoint

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


@pytest.fixture(scope="module", params=VARIANTS)
def generator(request: pytest.FixtureRequest, random_checkpoint: Callable[[str], Path]) -> Generator:
    """A float32 CPU generator over each variant's random checkpoint.

    A test that needs one variant only narrows it:
    ``@pytest.mark.parametrize("generator", ["tiny"], indirect=True)``."""
    return Generator.load(random_checkpoint(request.param), device="cpu", dtype=torch.float32)


@pytest.fixture
def scheduler(generator: Generator) -> Iterator[BatchScheduler]:
    """The scheduler running ``generator``'s requests (as many slots as its decode state), closed after the test."""
    with BatchScheduler(generator) as running:
        yield running
