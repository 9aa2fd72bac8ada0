"""The plain install is the fast install: pyproject.toml's base dependencies give every machine
kind the CPU engine it can have (OpenVINO + onnx where OpenVINO publishes wheels, onnxruntime on
Windows on Arm, neither elsewhere), and the ``openvino`` extra still installs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from convnext_keras.engines import graph_files

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    tomllib = pytest.importorskip("tomli")

PROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

#: ``platform_machine`` / ``sys_platform`` of each machine kind, and the engines it gets.
MACHINES = {
    "linux x86-64": ({"platform_machine": "x86_64", "sys_platform": "linux"}, {"openvino", "onnx"}),
    "linux aarch64": (
        {"platform_machine": "aarch64", "sys_platform": "linux"},
        {"openvino", "onnx"},
    ),
    "macOS arm64": ({"platform_machine": "arm64", "sys_platform": "darwin"}, {"openvino", "onnx"}),
    "Windows x86-64": (
        {"platform_machine": "AMD64", "sys_platform": "win32"},
        {"openvino", "onnx"},
    ),
    "Windows on Arm": (
        {"platform_machine": "ARM64", "sys_platform": "win32"},
        {"onnxruntime", "onnx"},
    ),
    "linux ppc64le": ({"platform_machine": "ppc64le", "sys_platform": "linux"}, set()),
}


def _installed(requirements, environment) -> set[str]:
    out = set()
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            out.add(requirement.name)
    return out


@pytest.mark.parametrize("machine", MACHINES)
def test_base_dependencies_give_each_machine_its_engine(machine):
    environment, engines = MACHINES[machine]
    names = _installed(PROJECT["dependencies"], environment)
    assert names & {"openvino", "onnxruntime", "onnx"} == engines
    assert {"keras", "numpy", "pillow"} <= names


def test_the_openvino_extra_is_an_alias_and_auto_picks_openvino_here():
    extra = {Requirement(line).name for line in PROJECT["optional-dependencies"]["openvino"]}
    assert extra == {"openvino", "onnx"}
    assert graph_files.GRAPH_ENGINES[0] == "openvino"
    assert graph_files.cpu_graph_engine() == "openvino"  # this project's machines: x86-64
