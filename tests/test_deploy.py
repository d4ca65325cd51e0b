"""What the images install: the lock files (scripts/lock.sh) pin every dependency that
pyproject.toml declares for the server and its engines, at versions its specifiers allow."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line} is not pinned"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


@pytest.mark.parametrize("lock, extras", [
    ("lock-cpu.txt", ["llamacpp", "transformers"]),
    ("lock-gpu.txt", ["llamacpp", "transformers", "vllm"]),
])
def test_the_lock_pins_every_dependency_of_pyproject_within_its_specifier(lock, extras):
    locked = pins(lock)
    wanted = PYPROJECT["dependencies"] + [d for e in extras for d in PYPROJECT["optional-dependencies"][e]]
    for dep in map(Requirement, wanted):
        name = canonicalize_name(dep.name)
        assert name in locked, f"{lock} lacks {dep.name}: run scripts/lock.sh"
        assert dep.specifier.contains(locked[name], prereleases=True), \
            f"{lock} pins {dep.name}=={locked[name]}, outside pyproject's {dep.specifier}: run scripts/lock.sh"


def test_the_cpu_image_gets_torchs_cpu_build_and_no_cuda_packages():
    locked = pins("lock-cpu.txt")
    assert locked["torch"].local == "cpu"
    assert not [n for n in locked if n.startswith("nvidia-") and n != "nvidia-ml-py"]
