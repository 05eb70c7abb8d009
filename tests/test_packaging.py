"""pyproject.toml and environment.yml declare the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {r.replace(" ", "") for r in project["dependencies"]}
    declared |= {r.replace(" ", "") for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = {r.replace(" ", "") for r in pip_list if not r.startswith("-e")}
    assert conda == declared, (f"only in pyproject: {sorted(declared - conda)}; "
                               f"only in environment.yml: {sorted(conda - declared)}")
