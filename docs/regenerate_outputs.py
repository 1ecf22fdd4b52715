"""Regenerate, or check, the examples' printed output that the docs show.

Each such block in a markdown file sits between two marker comments and holds one fenced code block:

    <!-- output: examples/quickstart.py --epochs 2 | tail 3 -->
    ```text
    …the printed lines…
    ```
    <!-- end output -->

The opening marker names a script (relative to the repository root) with its arguments, then optional
filters, each after a ``|``: ``from REGEX`` (start at the first line that matches), ``to REGEX`` (stop at the
first line from there on that matches, keeping it), ``head N`` and ``tail N``. Quote a regular expression
that holds spaces: ``from "^Most harmful"``. The script runs with this Python in a fresh temporary directory
(so that relative output paths such as ``influence_logs/version_0`` are the same in every run), with
``CUDA_VISIBLE_DEVICES`` empty; the filtered standard output becomes the block's body. Nothing outside the
marked blocks is touched.

    python docs/regenerate_outputs.py                      # rewrite every marked block of the docs
    python docs/regenerate_outputs.py --check              # exit 1 if a block differs from a fresh run
    python docs/regenerate_outputs.py --check --only quickstart   # only blocks whose marker contains this
    python docs/regenerate_outputs.py --list               # the marked blocks, nothing run
    python docs/regenerate_outputs.py docs/quickstart.md   # other files than the default ones

Before comparing, both sides are normalised: ANSI colours and progress-bar redraws (carriage returns) are
dropped, trailing spaces stripped, timings (``12.3 s``, ``57 ms``) replaced by ``<time>``, the temporary
directory by ``<tmp>`` and TensorBoard's ``version_<n>`` numbers by ``version_<n>``. Exit status: 0 when every
block is current (or was rewritten), 1 when ``--check`` finds a difference, 2 for a malformed block or a
script that fails.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/quickstart.md", "docs/label_noise.md")
BEGIN = re.compile(r"^<!-- output: (?P<spec>.+?) -->$")
END = "<!-- end output -->"
FENCE = re.compile(r"^(```+|~~~+)")
FILTERS = ("from", "to", "head", "tail")
TIMEOUT_S = 900


class BlockError(ValueError):
    """A marked block that cannot be read, or a script that fails."""


@dataclass(frozen=True)
class Block:
    """One marked block: ``lines[body_start:body_end]`` of its file is the body inside the fence."""

    path: Path
    line: int  # 1-based line of the opening marker
    spec: str
    command: tuple[str, ...]  # the script and its arguments
    filters: tuple[tuple[str, str], ...]
    body_start: int
    body_end: int
    body: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_spec(spec: str, where: str = "") -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``(command, filters)`` of a marker's text."""
    try:
        words = shlex.split(spec)
    except ValueError as err:
        raise BlockError(f"{where}: cannot split {spec!r}: {err}") from err
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "|":
            parts.append([])
        else:
            parts[-1].append(word)
    command, filters = tuple(parts[0]), []
    if not command or not command[0].endswith(".py"):
        raise BlockError(f"{where}: the marker must start with a Python script, got {spec!r}.")
    for part in parts[1:]:
        if len(part) != 2 or part[0] not in FILTERS:
            raise BlockError(f"{where}: unknown filter {' '.join(part)!r}; use one of {FILTERS} with one argument.")
        if part[0] in ("head", "tail") and not part[1].isdigit():
            raise BlockError(f"{where}: {part[0]} needs a number of lines, got {part[1]!r}.")
        filters.append((part[0], part[1]))
    return command, tuple(filters)


def parse(text: str, path: Path) -> list[Block]:
    """Every marked block of a markdown text, checked to be well formed."""
    lines, blocks, i = text.split("\n"), [], 0
    while i < len(lines):
        match = BEGIN.match(lines[i])
        if match is None:
            if lines[i].strip() == END:
                raise BlockError(f"{path}:{i + 1}: an end marker without an opening one.")
            i += 1
            continue
        where = f"{path}:{i + 1}"
        command, filters = parse_spec(match["spec"], where)
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise BlockError(f"{where}: the marker must be followed by a fenced code block (```text).")
        close = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == fence[1]), None)
        if close is None or close + 1 >= len(lines) or lines[close + 1].strip() != END:
            raise BlockError(f"{where}: the fenced block must close and be followed by {END!r}.")
        body = "\n".join(lines[i + 2 : close])
        blocks.append(Block(path, i + 1, match["spec"], command, filters, i + 2, close, body))
        i = close + 2
    return blocks


def render(text: str, blocks: list[Block], bodies: list[str]) -> str:
    """``text`` with each block's body replaced by the matching entry of ``bodies``."""
    lines = text.split("\n")
    for block, body in sorted(zip(blocks, bodies), key=lambda pair: -pair[0].body_start):
        lines[block.body_start : block.body_end] = body.split("\n") if body else []
    return "\n".join(lines)


def apply_filters(lines: list[str], filters: tuple[tuple[str, str], ...]) -> list[str]:
    for name, arg in filters:
        if name in ("from", "to"):
            hit = next((i for i, line in enumerate(lines) if re.search(arg, line)), None)
            if hit is None:
                raise BlockError(f"no output line matches {name} {arg!r}.")
            lines = lines[hit:] if name == "from" else lines[: hit + 1]
        else:
            lines = lines[: int(arg)] if name == "head" else lines[-int(arg) :] if int(arg) else []
    return lines


def clean(text: str) -> list[str]:
    """Printed text as a reader sees it: no ANSI codes, a redrawn line as its last state, no trailing spaces."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.replace("\r\n", "\n").split("\n")]


def normalise(text: str, tmp: str | None = None) -> str:
    """What the comparison ignores: timings, the temporary directory, TensorBoard's version numbers."""
    lines = clean(text if tmp is None else text.replace(tmp, "<tmp>"))
    out = [re.sub(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ms|s)\b", "<time>", line) for line in lines]
    out = [re.sub(r"version_\d+", "version_<n>", line) for line in out]
    return "\n".join(out).strip("\n")


def run(command: tuple[str, ...]) -> tuple[str, str]:
    """``(stdout, temporary directory)`` of one run of ``command`` in a fresh temporary directory."""
    script = ROOT / command[0]
    if not script.is_file():
        raise BlockError(f"no script {script}.")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}
    with tempfile.TemporaryDirectory(prefix="doc-output-") as tmp:
        done = subprocess.run(
            [sys.executable, str(script), *command[1:]], cwd=tmp, env=env, capture_output=True, text=True,
            timeout=TIMEOUT_S,
        )  # fmt: skip
    if done.returncode:
        raise BlockError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout, os.path.realpath(tmp)


def fresh_body(block: Block, runs: dict[tuple[str, ...], tuple[str, str]]) -> tuple[str, str]:
    """``(body, temporary directory)`` of a fresh run (one run per command, shared by its blocks)."""
    if block.command not in runs:
        print(f"running {' '.join(block.command)} ...", file=sys.stderr, flush=True)
        runs[block.command] = run(block.command)
    stdout, tmp = runs[block.command]
    try:
        lines = apply_filters(clean(stdout.rstrip()), block.filters)
    except BlockError as err:
        raise BlockError(f"{block.where}: {err}") from err
    return "\n".join(lines).replace(tmp, "<tmp>").strip("\n"), tmp


def process(path: Path, check: bool, only: str | None, runs: dict) -> bool:
    """Check or rewrite the blocks of one file; True when they are (now) current."""
    text = path.read_text(encoding="utf-8")
    blocks = [b for b in parse(text, path) if only is None or only in b.spec]
    bodies, current = [], True
    for block in blocks:
        body, tmp = fresh_body(block, runs)
        bodies.append(body)
        if normalise(block.body, tmp) != normalise(body, tmp):
            current = False
            diff = difflib.unified_diff(block.body.split("\n"), body.split("\n"), "docs", "fresh run", lineterm="")
            print(f"{block.where}: the output of `{block.spec}` differs:\n" + "\n".join(diff))
    if not check and not current:
        path.write_text(render(text, blocks, bodies), encoding="utf-8")
        print(f"{path}: rewritten")
    return current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help=f"markdown files (default: {', '.join(DOCS)})")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    parser.add_argument("--only", help="only the blocks whose marker contains this text")
    parser.add_argument("--list", action="store_true", help="list the marked blocks")
    args = parser.parse_args(argv)
    paths = [Path(f) for f in args.files] or [ROOT / f for f in DOCS]
    runs: dict[tuple[str, ...], tuple[str, str]] = {}
    try:
        if args.list:
            for path in paths:
                for block in parse(path.read_text(encoding="utf-8"), path):
                    print(f"{block.where}: {block.spec}")
            return 0
        current = [process(path, args.check, args.only, runs) for path in paths]
    except (BlockError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(current) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
