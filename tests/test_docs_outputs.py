"""The examples' printed output in the docs is what the examples print now (docs/regenerate_outputs.py).

The quickstart's block is checked against a fresh run of the example (about 15 s); the label-noise block
against ``examples/label_noise.py --seeds 1`` (about 30 s, marked slow: it still runs in CI). The script's own
parsing, filters, normalisation and rewriting are checked on a small markdown file with a script of known
output."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "regenerate_outputs.py"


def _regenerate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


def _module():
    spec = importlib.util.spec_from_file_location("regenerate_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_marked_block_is_well_formed_and_round_trips():
    tool = _module()
    found = {}
    for name in tool.DOCS:
        path = ROOT / name
        text = path.read_text(encoding="utf-8")
        blocks = tool.parse(text, path)
        assert tool.render(text, blocks, [b.body for b in blocks]) == text  # rewriting unchanged bodies: no change
        assert text.count("<!-- output:") == text.count("<!-- end output -->") == len(blocks)
        for block in blocks:
            assert (ROOT / block.command[0]).is_file(), block.where
            assert block.body.strip(), block.where
            found[block.command[0]] = block
    assert set(found) == {"examples/quickstart.py", "examples/label_noise.py"}


@pytest.mark.parametrize(
    ("marker", "problem"),
    [
        ("<!-- output: examples/x.py -->\nno fence\n<!-- end output -->", "fenced code block"),
        ("<!-- output: examples/x.py -->\n```text\na\n```\nno end marker", "followed by"),
        ("<!-- output: examples/x.py | grep a -->\n```text\na\n```\n<!-- end output -->", "unknown filter"),
        ("<!-- output: examples/x.py | tail x -->\n```text\na\n```\n<!-- end output -->", "number of lines"),
        ("<!-- output: ls -l -->\n```text\na\n```\n<!-- end output -->", "Python script"),
        ("text\n<!-- end output -->", "without an opening"),
    ],
)
def test_malformed_blocks_are_refused(tmp_path, marker, problem):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{marker}\n", encoding="utf-8")
    done = _regenerate("--list", str(doc))
    assert done.returncode == 2
    assert problem in done.stderr


def test_check_finds_a_stale_block_and_a_rewrite_fixes_only_the_blocks(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(
        textwrap.dedent(
            """\
            print("progress 10%\\rprogress 100%")
            print("header")
            print("result: 42 (took 1.5 s)")
            print("logs: influence_logs/version_3")
            print("footer")
            """
        ),
        encoding="utf-8",
    )
    doc = tmp_path / "doc.md"
    stale = (
        f"Intro, untouched.\n\n<!-- output: {script} | from ^header | to ^logs -->\n```text\nheader\n"
        "result: 41 (took 2.0 s)\nlogs: influence_logs/version_0\n```\n<!-- end output -->\n\nOutro, untouched.\n"
    )
    doc.write_text(stale, encoding="utf-8")

    done = _regenerate("--check", str(doc))
    assert done.returncode == 1, done.stderr
    assert "-result: 41 (took 2.0 s)" in done.stdout and "+result: 42 (took 1.5 s)" in done.stdout
    assert doc.read_text(encoding="utf-8") == stale  # --check writes nothing

    assert _regenerate(str(doc)).returncode == 0
    fresh = stale.replace("41 (took 2.0 s)", "42 (took 1.5 s)").replace("version_0", "version_3")
    assert doc.read_text(encoding="utf-8") == fresh

    # timings and TensorBoard version numbers are not differences
    doc.write_text(fresh.replace("1.5 s", "9.9 s").replace("version_3", "version_0"), encoding="utf-8")
    assert _regenerate("--check", str(doc)).returncode == 0
    # a failing script is an error, not a difference
    script.write_text("raise SystemExit(3)\n", encoding="utf-8")
    failed = _regenerate("--check", str(doc))
    assert failed.returncode == 2 and "exited with 3" in failed.stderr


def test_quickstart_output_in_the_docs_is_current():
    done = _regenerate("--check", "--only", "examples/quickstart.py")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_label_noise_output_in_the_docs_is_current():
    done = _regenerate("--check", "--only", "examples/label_noise.py")
    assert done.returncode == 0, done.stdout + done.stderr
