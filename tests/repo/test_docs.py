"""The README and docs/ say what the code does: the inputs table is the schema, links and paths exist.

These tests read the documents as text and compare them with the code (the OpenAPI schema Cog's
server validates against, the files in the tree, the modules in the package), so a rename or a
changed default that the documents do not follow fails here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tools import make_openapi_schema

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
README_LIMIT_BYTES = 10 * 1024
PACKAGE_DIR = "deepseek_vl2"
TEST_COMMAND = ".venv/bin/python -m pytest -q tests"


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown text (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def code_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks of a Markdown text."""
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)


def prose(text: str) -> str:
    """The text outside the fenced code blocks."""
    return re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)


@functools.cache
def schema_inputs() -> tuple[dict[str, Any], list[str]]:
    """Input properties and required names of the predictor cog.yaml names, as Cog sees them."""
    config = yaml.safe_load((REPO_ROOT / "cog.yaml").read_text(encoding="utf-8"))
    served = config.get("run") or config["predict"]  # cog 0.23's key, or the older one
    schema = make_openapi_schema.build_schema(str(REPO_ROOT / served))
    inputs = schema["components"]["schemas"]["Input"]
    return inputs["properties"], inputs.get("required", [])


def readme_input_rows() -> dict[str, list[str]]:
    """README's Inputs table: input name -> [type, default, allowed, meaning] cells."""
    rows: dict[str, list[str]] = {}
    for line in section(README.read_text(encoding="utf-8"), "Inputs").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for name in re.findall(r"`([a-z_0-9]+)`", cells[0]):
            rows[name] = cells[1:]
    return rows


def test_readme_is_a_front_door_not_the_house() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move details to docs/"


def test_readme_inputs_table_lists_exactly_the_schema_inputs() -> None:
    properties, _ = schema_inputs()
    assert sorted(readme_input_rows()) == sorted(properties)


@pytest.mark.parametrize("name", sorted(readme_input_rows()))
def test_readme_inputs_row_matches_the_schema(name: str) -> None:
    properties, required = schema_inputs()
    assert name in properties, f"README documents an input the schema lacks: {name}"
    spec = properties[name]
    kind, default, allowed, _ = readme_input_rows()[name]
    if spec.get("format") == "uri":
        expected_kind = "file"
    elif "anyOf" in spec:  # e.g. "string or array"
        expected_kind = " or ".join(variant["type"] for variant in spec["anyOf"])
    else:
        expected_kind = spec["type"]
    assert kind == expected_kind
    if name in required:
        assert default == "required"
    elif spec.get("default") is None:
        assert default in ("none", "random")
    else:
        assert float(default) == pytest.approx(spec["default"])
    if "minimum" in spec or "maximum" in spec:
        bounds = re.fullmatch(r"(-?[\d.]+) – (-?[\d.]+)", allowed)
        assert bounds, f"{name}: the allowed cell {allowed!r} should read 'low – high'"
        assert float(bounds.group(1)) == spec["minimum"]
        assert float(bounds.group(2)) == spec["maximum"]


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda path: path.name)
def test_relative_links_point_to_files_that_exist(document: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(document.read_text(encoding="utf-8")))
    missing = [link for link in links if "://" not in link
               and not (document.parent / link).exists()]
    assert not missing, f"{document.name} links to missing files: {missing}"


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda path: path.name)
def test_paths_the_documents_name_exist(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    named = set(re.findall(
        r"(?<![\w/.-])((?:deepseek_vl2|scripts|tools|tests|examples|docs)/[\w/.-]*\w)", text))
    missing = [path for path in sorted(named)
               if not (REPO_ROOT / path).exists() and not (REPO_ROOT / path.split("::")[0]).exists()]
    assert not missing, f"{document.name} names paths that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` is a module, or an attribute reachable from the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            continue
        target: Any = importlib.import_module(module_name)
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda path: path.name)
def test_dotted_names_the_documents_use_exist(document: Path) -> None:
    names = set(re.findall(r"\bdeepseek_vl2(?:\.[A-Za-z_]\w*)+", document.read_text(encoding="utf-8")))
    missing = sorted(name for name in names if not _resolves(name))
    assert not missing, f"{document.name} names modules or objects that do not exist: {missing}"


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda path: path.name)
def test_tools_the_documents_run_exist(document: Path) -> None:
    """Every ``python -m tools.X`` a document shows names a module of tools/ (found, not run)."""
    names = set(re.findall(r"-m (tools(?:\.\w+)+)", document.read_text(encoding="utf-8")))
    missing = sorted(name for name in names if importlib.util.find_spec(name) is None)
    assert not missing, f"{document.name} runs tools that do not exist: {missing}"


def test_readme_commands_use_the_project_venv() -> None:
    """Every Python command in the README runs with .venv/bin/python, never a bare `python`."""
    bare = [line for block in code_blocks(README.read_text(encoding="utf-8"))
            for line in block.splitlines() if re.match(r"\s*(\S+=\S+\s+)*python3?\s", line)]
    assert not bare, f"bare python in README commands: {bare}"


def test_readme_and_ci_run_the_same_test_command() -> None:
    readme_lines = [line.strip() for block in code_blocks(README.read_text(encoding="utf-8"))
                    for line in block.splitlines()]
    assert TEST_COMMAND in readme_lines
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci_lines


def test_readme_server_examples_say_which_weights() -> None:
    """A server started as the README says never falls through to the 55 GB default download."""
    for block in code_blocks(README.read_text(encoding="utf-8")):
        for line in block.splitlines():
            if "scripts/serve.sh" in line and not line.lstrip().startswith("#"):
                assert re.search(r"\b(COG_WEIGHTS|DSVL2_VARIANT)=\S", line), line


def test_readme_example_files_are_shipped() -> None:
    """Every image a README command reads is in the tree (outputs go to /tmp, absolute paths)."""
    commands = "\n".join(code_blocks(README.read_text(encoding="utf-8")))
    used = set(re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:png|jpe?g|webp|gif))\b", commands))
    assert used, "the README's examples should use the shipped images"
    missing = sorted(name for name in used if not (REPO_ROOT / name).is_file())
    assert not missing, f"README commands use images that are not shipped: {missing}"


EXAMPLE_IMAGES = ("chart.png", "street.png", "before.png", "after.png")


@pytest.fixture(scope="module")
def drawn_examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh drawing of the example images by examples/make_examples.py."""
    out = tmp_path_factory.mktemp("examples")
    subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "make_examples.py"), "--out",
                    str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("name", EXAMPLE_IMAGES)
def test_example_images_are_what_the_script_draws_and_small(name: str, drawn_examples: Path) -> None:
    committed = REPO_ROOT / "examples" / name
    assert committed.stat().st_size < 10_000
    with Image.open(committed) as shipped, Image.open(drawn_examples / name) as drawn:
        assert shipped.convert("RGB").tobytes() == drawn.convert("RGB").tobytes()


def test_grounding_example_is_what_the_documented_command_draws(tmp_path: Path) -> None:
    """docs/grounding_example.png is reproduced by the command docs/grounding.md shows."""
    text = (REPO_ROOT / "docs" / "grounding.md").read_text(encoding="utf-8")
    block = next(b for b in code_blocks(text) if "--out-image docs/grounding_example.png" in b)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:3] == [".venv/bin/python", "-m", "deepseek_vl2.grounding"]
    out = tmp_path / "example.png"
    argv[argv.index("--out-image") + 1] = str(out)
    subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, check=True, capture_output=True)
    with Image.open(REPO_ROOT / "docs" / "grounding_example.png") as shipped, Image.open(out) as drawn:
        assert shipped.tobytes() == drawn.tobytes()


def test_code_points_only_to_docs_that_exist() -> None:
    """`docs/….md` named in code, cog.yaml, scripts or tools exists (cog.yaml once pointed to a missing one)."""
    sources = [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("*.yaml"), *(REPO_ROOT / PACKAGE_DIR).rglob("*.py"),
               *(REPO_ROOT / "scripts").glob("*"), *(REPO_ROOT / "tools").rglob("*"),
               *(REPO_ROOT / "tests").rglob("*.py")]
    missing = sorted({f"{path.relative_to(REPO_ROOT)}: {name}" for path in sources if path.is_file()
                      for name in re.findall(r"\bdocs/[\w.-]+\.(?:md|txt|png)\b", path.read_text(encoding="utf-8"))
                      if not (REPO_ROOT / name).exists()})
    assert not missing, missing


# Words about how the project was made, not about what it does: GPU loans, work sessions, ticket
# numbers, notes kept beside the project. The product speaks to its users ("not yet measured on
# a GPU", the name of the thing rather than its ticket).
BUILD_WORDING = re.compile(
    r"\blent\b|\blending\b|\bthis session\b|\bthe sessions\b|\bissue #?\d+|\btickets?\b"
    r"|\bthe facts file\b|\bround \d+\b(?!\.\d)|\bthis round\b",
    re.I)
PRODUCT_FILES = ("README.md", "predict.py", "cog.yaml", ".ci", "docs", "deepseek_vl2", "scripts",
                 "tools", "examples", "tests")


def product_texts() -> list[Path]:
    """Every text file of the product (README, code, docs, scripts, tools, tests, CI), this one excepted."""
    files = []
    for name in PRODUCT_FILES:
        root = REPO_ROOT / name
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path != Path(__file__).resolve():
                files.append(path)
    return files


def test_the_product_says_nothing_about_how_it_was_made() -> None:
    found = []
    for path in product_texts():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images
        found += [f"{path.relative_to(REPO_ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"
                  for match in BUILD_WORDING.finditer(text)]
    assert not found, "say it in the user's terms (e.g. 'not yet measured on a GPU'): " + "; ".join(found)


def test_the_wording_check_catches_what_it_should() -> None:
    caught = ["No GPU was lent to this session", "as issue 12 asks", "see the facts file",
              "before this round", "ticket 4"]
    passed = ["alpha blending on white", "rounded to 3 digits", "a known issue of coglet 0.23.1",
              "issues a warning", "round 0.5 up"]
    assert all(BUILD_WORDING.search(text) for text in caught)
    assert not any(BUILD_WORDING.search(text) for text in passed), [t for t in passed if BUILD_WORDING.search(t)]
