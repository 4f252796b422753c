"""The engine's settings: read once from the environment into EngineConfig, each invalid value refused
with one error naming its variable and the values it accepts; nothing else in the package reads them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deepseek_vl2.engine.config import (COMPILE_ENV, SLOTS_ENV, STEP_TIMEOUT_ENV, STREAMING_ENV, WARMUP_SECONDS_ENV,
                                        ConfigError, EngineConfig)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_when_nothing_is_set() -> None:
    config = EngineConfig.from_environment({})
    assert config == EngineConfig()
    assert (config.slots, config.compile, config.warmup_seconds, config.streaming) == (1, None, 300.0, "auto")
    assert (config.prefill_chunk, config.kv_bucket, config.max_waiting) == (512, 256, 64)
    assert config.step_timeout_seconds == 600.0
    assert EngineConfig.from_environment({SLOTS_ENV: "", COMPILE_ENV: " "}) == EngineConfig()


def test_values_are_read() -> None:
    config = EngineConfig.from_environment({SLOTS_ENV: "8", COMPILE_ENV: "0", WARMUP_SECONDS_ENV: "12.5",
                                            STREAMING_ENV: " Collect "})
    assert (config.slots, config.compile, config.warmup_seconds, config.streaming) == (8, False, 12.5, "collect")
    assert EngineConfig.from_environment({STEP_TIMEOUT_ENV: "90"}).step_timeout_seconds == 90.0


def test_compile_switch() -> None:
    unset = EngineConfig.from_environment({})
    assert (unset.compile_on("cpu"), unset.compile_on("cuda")) == (False, True)
    on = EngineConfig.from_environment({COMPILE_ENV: "1"})
    assert on.compile_on("cpu") and on.compile_on("cuda")
    off = EngineConfig.from_environment({COMPILE_ENV: "0"})
    assert not off.compile_on("cuda") and not off.compile_on("cpu")


@pytest.mark.parametrize(("name", "value", "allowed"), [
    (COMPILE_ENV, "yes", "0 (eager) or 1 (compiled)"),
    (SLOTS_ENV, "eight", "an integer >= 1"),
    (SLOTS_ENV, "0", "an integer >= 1"),
    (SLOTS_ENV, "2.5", "an integer >= 1"),
    (WARMUP_SECONDS_ENV, "soon", "a number of seconds >= 0"),
    (WARMUP_SECONDS_ENV, "-1", "a number of seconds >= 0"),
    (WARMUP_SECONDS_ENV, "nan", "a number of seconds >= 0"),
    (STREAMING_ENV, "stream", "auto or collect"),
    (STEP_TIMEOUT_ENV, "0", "a number of seconds > 0"),
    (STEP_TIMEOUT_ENV, "inf", "a number of seconds > 0"),
    (STEP_TIMEOUT_ENV, "later", "a number of seconds > 0"),
])
def test_invalid_values_name_the_variable_and_the_allowed_values(name: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as raised:
        EngineConfig.from_environment({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name} must be {allowed}") and repr(value) in message


@pytest.mark.parametrize("values", [dict(slots=0), dict(prefill_chunk=0), dict(kv_bucket=True), dict(compile="1"),
                                    dict(warmup_seconds=float("inf")), dict(streaming="stream"),
                                    dict(max_waiting=-1), dict(step_timeout_seconds=0)])
def test_direct_construction_is_checked_too(values: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(values))):
        EngineConfig(**values)


def test_the_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        EngineConfig().slots = 2  # type: ignore[misc]


def _environment_readers(path: Path) -> list[int]:
    """Lines of ``path`` that read the process environment (os.environ / os.getenv)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
    return lines


def test_only_the_config_and_the_weights_read_the_environment() -> None:
    """Engine settings are read in engine/config.py; the checkpoint's variables in weights/."""
    allowed = {"deepseek_vl2/engine/config.py", "deepseek_vl2/weights/resolve.py", "deepseek_vl2/weights/fetch.py"}
    files = [*sorted((REPO_ROOT / "deepseek_vl2").rglob("*.py")), REPO_ROOT / "predict.py"]
    readers = {str(f.relative_to(REPO_ROOT)): lines for f in files if (lines := _environment_readers(f))}
    assert set(readers) <= allowed, {k: v for k, v in readers.items() if k not in allowed}
    assert "deepseek_vl2/engine/config.py" in readers, "the check must see the one reader"


def test_the_checkpoint_variables_are_read_in_one_place() -> None:
    from deepseek_vl2.weights.resolve import DEFAULT_WEIGHTS_DIR, WeightsEnvironment

    unset = WeightsEnvironment.from_environment({"COG_WEIGHTS": "", "DSVL2_VARIANT": ""})
    assert (unset.weights, unset.variant, unset.download_dir) == (None, None, DEFAULT_WEIGHTS_DIR)
    assert unset.hub == "https://huggingface.co"
    given = WeightsEnvironment.from_environment({"COG_WEIGHTS": "/ckpt", "DSVL2_VARIANT": "tiny",
                                                 "DSVL2_DOWNLOAD_DIR": "/dl", "HF_ENDPOINT": "http://hub"})
    assert (given.weights, given.variant, str(given.download_dir), given.hub) == ("/ckpt", "tiny", "/dl", "http://hub")
