"""The Dockerfile's promise of a read-only root filesystem with nothing compiled at run time."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _final_stage() -> str:
    text = (REPO / "Dockerfile").read_text()
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]


def test_final_stage_compiles_the_standard_library_before_dropping_root() -> None:
    """The python base images delete the stdlib's .pyc files; with a read-only root filesystem every start
    would compile what it imports again. The final stage must compile the stdlib itself, as root."""
    stage = _final_stage()
    compile_at = stage.find("-m compileall")
    assert compile_at >= 0, "the final stage compiles no bytecode"
    assert "stdlib" in stage[compile_at : stage.find("\n", compile_at)]
    assert compile_at < stage.find("USER 65532")


def test_the_venv_is_compiled_in_the_build_stage() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "compileall -q -j 0 /opt/outbound-relay" in text
