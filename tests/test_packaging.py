"""Package boundaries: the agent installs and runs without torch or the server stack, and no
package imports what ARCHITECTURE.md forbids."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "edgewise"

FORBIDDEN = {
    "artifacts": {"server", "agent", "ml"},
    "trust": {"server", "agent", "ml"},
    "server": {"agent", "ml"},
    "agent": {"server", "ml"},
    "ml": {"server", "agent"},
    "sim": {"ml"},
    "llm": {"server", "agent", "ml"},
}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_agent_extra_does_not_pull_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = _requirement_names(project["dependencies"] + project["optional-dependencies"]["agent"])
    assert not names & {"torch", "fastapi", "sqlalchemy", "uvicorn", "mlflow", "onnx"}
    assert {"onnxruntime", "numpy", "httpx", "tuf", "zstandard"} <= names


def test_llm_extra_is_the_runtime_and_the_gguf_reader_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = _requirement_names(project["optional-dependencies"]["llm"])
    assert names == {"llama-cpp-python", "gguf"}


def test_agent_imports_without_torch_or_server_stack() -> None:
    code = (
        "import sys, edgewise.agent, edgewise.trust, edgewise.artifacts, edgewise.llm\n"
        "import edgewise.cli._agent\n"
        "bad = sorted(m for m in ('torch', 'fastapi', 'sqlalchemy', 'uvicorn', 'onnx',"
        " 'llama_cpp', 'gguf')"
        " if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_architecture_import_rules(package: str) -> None:
    offenders = []
    for path in (SRC / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    names = [node.module or ""]
                else:
                    depth = len(path.relative_to(SRC).parts) - node.level
                    base = ".".join(path.relative_to(SRC).parts[:max(depth, 0)])
                    names = [f"edgewise.{base}.{node.module or ''}".replace("..", ".")]
                    if depth <= 0:
                        names = [f"edgewise.{node.module or ''}"]
            for name in names:
                parts = name.split(".")
                if parts[0] == "edgewise" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []
