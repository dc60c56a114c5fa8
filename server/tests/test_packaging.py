"""The pip package (../pyproject.toml, maturin) and the shard's own project (server/pyproject.toml)
must ask for the same dependencies: the wheel is the shard plus the two Rust binaries."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_and_the_shard_project_depend_on_the_same_packages():
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shard = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())
    assert wheel["project"]["dependencies"] == shard["project"]["dependencies"]
    assert wheel["project"]["optional-dependencies"]["convert"] == shard["project"]["optional-dependencies"]["convert"]
    assert wheel["tool"]["maturin"]["bindings"] == "bin"
    script = ROOT / wheel["tool"]["maturin"]["data"] / "scripts" / "text-generation-server"
    assert script.read_text().startswith("#!python\n"), "installers rewrite only a '#!python' first line"
    entry = shard["project"]["scripts"]["text-generation-server"].replace(":", " import ").replace("text_", "from text_", 1)
    assert entry in script.read_text()
