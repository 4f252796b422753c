"""The curl examples of README.md and docs/cog.md run as written against the server the README starts.

The server is Cog's real HTTP server on predict.py with a tiny random-weight checkpoint (what the
README's "A local server" serves). Each bash block of the "Calling the server" sections of both
documents is run by bash from the repository root, with only the address changed to the test
server's free port. The cancelling block is left out here because it times a cancel with `sleep`;
cancellation through the server is tested in test_predict_http.py and test_robustness.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl2.inputs.processor import DeepseekVL2Processor, build_conversation
from tools.testing.cog_server import CogServer

REPO_ROOT = Path(__file__).resolve().parents[2]
README_ADDRESS = "http://127.0.0.1:5000"
EXAMPLE_DOCUMENTS = ("README.md", "docs/cog.md")


pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "curl", "jq", "base64")),
    reason="the README's examples need bash, curl, jq and base64",
)


def server_blocks() -> list[str]:
    """The bash blocks of the "Calling the server" sections of README.md and docs/cog.md, in order."""
    blocks = []
    for document in EXAMPLE_DOCUMENTS:
        text = (REPO_ROOT / document).read_text(encoding="utf-8")
        match = re.search(r"^## Calling the server\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        assert match, f"{document} has no '## Calling the server' section"
        found = re.findall(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)
        assert found, f"{document}'s 'Calling the server' has no bash block"
        blocks += found
    assert all(README_ADDRESS in block for block in blocks)
    return blocks


def block_with(marker: str) -> str:
    """The one server block containing ``marker``."""
    found = [block for block in server_blocks() if marker in block]
    assert len(found) == 1, f"expected one example block with {marker!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> Path:
    """The checkpoint the shared server (`cog_predictor`) serves."""
    return random_checkpoint("tiny")


@pytest.fixture(scope="module")
def server(cog_predictor: CogServer) -> CogServer:
    """The README's "A local server": Cog's server on cog.yaml's predictor (tests/conftest.py)."""
    return cog_predictor


def run_block(block: str, server: CogServer) -> str:
    """Run a README block with bash against ``server``; its standard output."""
    script = "set -euo pipefail\n" + block.replace(README_ADDRESS, server.base_url)
    result = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr}"
    return result.stdout


ONE_ANSWER, TEXT_ONLY, FOLLOW_UP = "What does this chart show?", "haiku", "messages"


def test_the_one_answer_example_succeeds(server: CogServer) -> None:
    answer = json.loads(run_block(block_with(ONE_ANSWER), server))
    assert answer["status"] == "succeeded"
    assert isinstance(answer["answer"], str) and answer["answer"]
    assert answer["metrics"]["output_token_count"] == 64


def test_the_streaming_example_streams_events(server: CogServer) -> None:
    output = run_block(block_with("text/event-stream"), server)
    events = re.findall(r"^event: (\w+)$", output, re.M)
    assert events[0] == "start" and events[-1] == "completed"
    assert events.count("output") >= 2


def test_the_text_only_example_succeeds_without_an_image(server: CogServer) -> None:
    block = block_with(TEXT_ONLY)
    assert "image" not in block
    before = len(server.log())
    answer = json.loads(run_block(block, server))
    assert answer["status"] == "succeeded"
    assert isinstance(answer["answer"], str) and answer["answer"]
    log = server.log()[before:]
    assert "prompt tokens" in log and "image 1:" not in log


def test_the_follow_up_example_sends_the_earlier_turns(server: CogServer, checkpoint: Path) -> None:
    """The model sees the earlier turns: the prompt length is that of the whole conversation."""
    block = block_with(FOLLOW_UP)
    history = json.loads(re.search(r"--arg messages '(.*?)'", block, re.S).group(1))
    prompt = re.search(r'prompt: "(.*?)"', block).group(1)
    image = re.search(r"base64 -w0 (\S+)\)", block).group(1)
    with Image.open(REPO_ROOT / image) as opened:
        images = [opened.convert("RGB")]
    processor = DeepseekVL2Processor.from_pretrained(checkpoint)
    expected = processor.process(build_conversation(prompt, 1, history=history), images, "",
                                 system_prompt_in_tokens=True, user_text_specials="structural")
    assert len(history) == 2 and expected.earlier_text_tokens > 0
    before = len(server.log())
    answer = json.loads(run_block(block, server))
    assert answer["status"] == "succeeded"
    assert isinstance(answer["answer"], str) and answer["answer"]
    assert f"prompt tokens: {expected.input_ids.numel()}," in server.log()[before:]


def test_the_bad_input_example_gets_the_answer_the_readme_shows(server: CogServer) -> None:
    block = block_with("temperature: 3")
    shown = re.search(r"^# (\{.*\})$", block, re.M)
    assert shown, "the example shows the answer as a comment"
    assert json.loads(run_block(block, server)) == json.loads(shown.group(1))


def test_every_server_block_is_covered() -> None:
    """A new example block must be added here (or to the cancelling exception) to be tested."""
    covered = (ONE_ANSWER, TEXT_ONLY, FOLLOW_UP, "text/event-stream", "temperature: 3", "/cancel")
    assert all(sum(marker in block for marker in covered) == 1 for block in server_blocks())
