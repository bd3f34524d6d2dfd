"""The operator registry finds plugins through the ``deepflow.operators`` entry-point group:
real distributions (a ``*.dist-info`` folder with ``entry_points.txt``) put on sys.path."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from deepflow.dag.operators import (
    ENTRY_POINT_GROUP,
    Operator,
    OperatorFailed,
    Registry,
    _entry_points,
)


def install_plugin(
    root: Path, monkeypatch: pytest.MonkeyPatch, entry_points: dict[str, str], source: str
) -> str:
    """A distribution in ``root`` holding one module (``source``) and ``entry_points`` (name ->
    value, ``{module}`` standing for the module's unique name); ``root`` goes on sys.path."""
    module = f"df_test_plugin_{uuid.uuid4().hex[:8]}"
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    lines = [f"{name} = {value.format(module=module)}" for name, value in entry_points.items()]
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
    (root / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(root))
    return module


PLUGIN = """
from deepflow.dag.operators import Operator

OPERATORS = (Operator("plug.double", lambda args: 2 * args["x"], description="Doubles x."),)


def more():
    return [Operator("plug.negate", lambda args: -args["x"])]
"""


def test_a_module_and_a_callable_named_by_entry_points_are_found_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path, monkeypatch, {"plug": "{module}", "more": "{module}:more"}, PLUGIN)
    registry = Registry()
    registry.register(Operator("local", lambda args: "here"))
    assert registry.run("plug.double", {"x": 21}) == 42
    assert registry.run("plug.negate", {"x": 1}) == -1
    assert registry.get("plug.double").description == "Doubles x."
    assert {"local", "plug.double", "plug.negate"} <= set(registry.names())
    assert registry.broken == {}


def test_an_implementation_replaces_the_name_a_job_kind_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path, monkeypatch, {"plug": "{module}"}, PLUGIN)
    registry = Registry()
    registry.declare("plug.double", "declared by a job kind")
    assert registry.get("plug.double").run is not None


def test_a_broken_plugin_is_reported_and_does_not_hide_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path / "good", monkeypatch, {"good": "{module}"}, PLUGIN)
    broken = install_plugin(
        tmp_path / "bad", monkeypatch, {"bad": "{module}"}, "raise ImportError('no torch_npu')\n"
    )
    registry = Registry()
    registry.declare("bad.op", "implemented by the broken plugin")
    assert registry.run("plug.double", {"x": 1}) == 2
    assert registry.broken == {f"bad = {broken}": "ImportError: no torch_npu"}
    with pytest.raises(OperatorFailed, match=r"no implementation.*bad = .*no torch_npu"):
        registry.run("bad.op", {})
    with pytest.raises(KeyError, match="no torch_npu"):
        registry.get("nothing.like.it")


def test_a_module_without_operators_is_a_broken_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = install_plugin(tmp_path, monkeypatch, {"empty": "{module}"}, "X = 1\n")
    registry = Registry()
    registry.load_entry_points()
    assert registry.broken == {
        f"empty = {module}": f"TypeError: operator plugin empty = {module}: "
        "the module has no OPERATORS"
    }


def test_two_plugins_may_not_implement_one_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin(tmp_path / "a", monkeypatch, {"a": "{module}"}, PLUGIN)
    install_plugin(tmp_path / "b", monkeypatch, {"b": "{module}"}, PLUGIN)
    registry = Registry()
    registry.load_entry_points()
    assert len(registry.broken) == 1
    assert "already registered" in next(iter(registry.broken.values()))


def test_the_platforms_serving_operators_are_a_plugin_of_its_own_distribution() -> None:
    ours = {ep.name: ep.value for ep in _entry_points(ENTRY_POINT_GROUP)}
    assert ours["deploy"] == "deepflow.replicas.operators"
    registry = Registry()
    launch = registry.get("deploy.launch_replica")
    assert launch.run is not None and launch.takes_context


def test_a_stale_egg_info_of_the_same_name_does_not_hide_the_installed_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setuptools leaves ``deepflow.egg-info`` in source folders that are on sys.path; the
    first distribution of a name must not be the only one read."""
    stale = tmp_path / "deepflow.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: deepflow\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Registry().get("deploy.launch_replica").run is not None


def test_the_development_override_imports_modules_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "df_dev_ops.py").write_text(PLUGIN)
    registry = Registry(group=None)
    registry.load_modules(["df_dev_ops"])
    assert registry.names() == ["plug.double"]
