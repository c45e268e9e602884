"""The package layout: the layer contract (import-linter), torch only where it is allowed, the
deprecated aliases of moved modules, and every package in pyproject's list."""

import ast
import importlib
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sat_cli"
PLUGINS = ROOT / "plugins"
TORCH = {"torch", "torchvision", "timm"}
# The modules that may import torch at module level: the network itself and the plugins' private
# encoder modules (loaded on the first build).
TORCH_ALLOWED = {"sat_cli/model/backbone.py", "sat_cli/model/decoder.py", "sat_cli/model/teacher.py", "plugins/_timm.py", "plugins/_torchvision.py"}
SHIMS = {"hookspecs": ("hookimpl", "hookspec", "register_encoders", "register_weights"),
         "encoders": ("EncoderFamily", "EncoderOptions", "Preprocess", "create_encoder", "families"),
         "backbone": ("Encoder", "load_into", "load_weights_file")}


def module_level_imports(tree: ast.AST):
    """(top-level package, line) of every import that runs when the module is imported: those in
    functions run later, those under ``if TYPE_CHECKING:`` never."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno))
            visit(child)

    visit(tree)
    return found


def test_module_level_import_finder_sees_what_runs_at_import():
    tree = ast.parse(textwrap.dedent("""
        import os, torch.nn
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import timm
        try:
            from torchvision import models
        except ImportError:
            pass
        class A:
            import numpy
            def f(self):
                import PIL
        def g():
            import matplotlib
    """))
    assert [name for name, _ in module_level_imports(tree)] == ["os", "torch", "typing", "torchvision", "numpy"]


def test_torch_is_imported_at_module_level_only_by_the_model_modules():
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *PLUGINS.rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for name, line in module_level_imports(ast.parse(path.read_text(), rel)):
            if name in TORCH and rel not in TORCH_ALLOWED:
                offenders.append(f"{rel}:{line} imports {name}")
    assert offenders == [], "import torch inside the functions that need it:\n" + "\n".join(offenders)


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_sat_help_and_every_command_help_do_not_import_torch():
    out = run_python("""
        import sys
        from click.testing import CliRunner
        from sat_cli.cli import cli

        def commands(group, prefix):
            for name, command in group.commands.items():
                yield prefix + [name]
                if hasattr(command, "commands"):
                    yield from commands(command, prefix + [name])

        runner = CliRunner()
        for args in [[]] + list(commands(cli, [])):
            result = runner.invoke(cli, args + ["--help"])
            assert result.exit_code == 0, (args, result.output)
        print(len(list(commands(cli, []))), sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "timm"})[:3])
    """)
    count, _, loaded = out.strip().partition(" ")
    assert int(count) >= 10 and loaded == "[]", out


def test_no_module_outside_the_model_pulls_in_torch_when_imported():
    """Importing every other module (the whole tree but the torch modules themselves) loads no torch:
    what a command imports at start-up stays light."""
    skip = {"sat_cli.model.backbone", "sat_cli.model.decoder", "sat_cli.model.teacher", "sat_cli.backbone"}
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if "models" not in parts and name not in skip and parts[-1] != "__main__":
            names.append(name)
    out = run_python(f"""
        import importlib, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in {names!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.split(".")[0] in {sorted(TORCH)!r}))
    """)
    assert len(names) > 40 and out.strip() == "[]", out


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_old_import_paths_warn_and_give_the_moved_modules_objects(old):
    new = importlib.import_module(f"sat_cli.model.{old}")
    sys.modules.pop(f"sat_cli.{old}", None)
    with pytest.warns(DeprecationWarning, match=rf"sat_cli\.{old} has moved to sat_cli\.model\.{old}"):
        shim = importlib.import_module(f"sat_cli.{old}")
    for name in SHIMS[old]:
        assert getattr(shim, name) is getattr(new, name), name
    public = [name for name in vars(new) if not name.startswith("_")]
    assert all(getattr(shim, name) is getattr(new, name) for name in public)
    private = [name for name in vars(new) if name.startswith("_") and not name.startswith("__")]
    assert all(getattr(shim, name) is getattr(new, name) for name in private)


def test_a_plugin_written_against_the_old_paths_still_registers(tmp_path, monkeypatch):
    from sat_cli.model.backbone import Encoder
    from sat_cli.model.encoders import create_encoder, families
    from sat_cli.model.plugins import pm

    (tmp_path / "old_style_plugin.py").write_text(textwrap.dedent('''
        import torch
        from sat_cli.hookspecs import hookimpl
        from sat_cli.encoders import EncoderFamily, Preprocess
        from sat_cli.backbone import Encoder

        class Patches(Encoder):
            def __init__(self):
                super().__init__("old:patches", Preprocess(size=(32, 32)), 12, None)
                self.backbone = torch.nn.Conv2d(3, 12, kernel_size=8, stride=8)
            def feature_map(self, x):
                return self.backbone(x)

        @hookimpl
        def register_encoders(register):
            register(EncoderFamily("old", lambda name, options: Patches(), "a plugin of the previous layout"))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    for old in SHIMS:
        sys.modules.pop(f"sat_cli.{old}", None)
    with pytest.warns(DeprecationWarning):
        plugin = importlib.import_module("old_style_plugin")
    pm.register(plugin, name="old-style")
    try:
        assert families()["old"].plugin == "old-style"
        encoder = create_encoder("old:patches")
        assert isinstance(encoder, Encoder) and encoder.spec == "old:patches"
    finally:
        pm.unregister(name="old-style")
        sys.modules.pop("old_style_plugin", None)
    assert "old" not in families()


def test_every_package_is_in_pyprojects_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    data = {".".join(p.relative_to(ROOT).parts) for p in (PACKAGE / "views" / "assets", PACKAGE / "models" / "default")}
    assert found | data | {"sat_cli.models", "sat_cli_plugins"} == listed
    assert config["package-data"]["sat_cli.views.assets"] == ["*.js", "*.css"]


def test_the_console_script_and_python_m_still_reach_the_click_group():
    import click

    from sat_cli.cli.main import cli

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"sat": "sat_cli.cli:cli"}
    module, _, name = project["scripts"]["sat"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli and isinstance(cli, click.Group)
    out = subprocess.run([sys.executable, "-m", "sat_cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("sat, version "), out.stdout + out.stderr


def lint_imports():
    pytest.importorskip("importlinter")
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        exe = shutil.which("lint-imports")
    if not exe:
        pytest.skip("lint-imports is not installed")
    return str(exe)


def test_the_layer_contract_is_kept():
    out = subprocess.run([lint_imports(), "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_the_layer_contract_catches_a_lower_layer_importing_a_higher_one(tmp_path):
    """A copy of the package where storage imports a view, even inside a function: the contract breaks."""
    shutil.copytree(PACKAGE, tmp_path / "sat_cli", ignore=shutil.ignore_patterns("models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "sat_cli" / "store" / "queries.py", "a") as f:
        f.write("\n\ndef _gallery():\n    from ..views import gallery\n")
    out = subprocess.run([lint_imports(), "--no-cache"], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sat_cli.store is not allowed to import sat_cli.views" in out.stdout
    assert "sat_cli.store.queries -> sat_cli.views.gallery" in out.stdout
