"""File habits shared by every artifact the package writes (windows, final scores, the audit, the trajectory).

- Appended JSON lines are flushed and fsynced one by one; a crash leaves at most a partial last line, which
  readers skip with a warning and writers cut before appending again.
- Whole files are written to a temporary file next to the target, fsynced and moved onto it: a file is
  either its old self or whole.
- Every record carries ``format`` and ``version``; a reader refuses another format or a newer version.

Nothing here knows Lightning.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch

PathLike = Union[str, os.PathLike]


def float_list(values: torch.Tensor) -> list[float]:
    """``values`` flattened into Python floats, for JSON."""
    # float64 holds every float32/float16/bfloat16 value exactly, and Python floats are float64.
    return [float(v) for v in values.detach().cpu().to(torch.float64).reshape(-1).tolist()]


def int_list(values: torch.Tensor) -> list[int]:
    """``values`` flattened into Python ints, for JSON."""
    return [int(v) for v in values.detach().cpu().reshape(-1).tolist()]


def artifact_file(path: PathLike, filename: str, what: str) -> Path:
    """``path`` itself, or ``path/filename`` when ``path`` is a folder; ``FileNotFoundError`` naming both otherwise."""
    p = Path(path)
    file = p / filename if p.is_dir() else p
    if not file.is_file():
        where = f"in the directory {p}" if p.is_dir() else f"at {p}"
        raise FileNotFoundError(
            f"No influence {what} {where}: expected {filename}, which InfluenceTracker writes to "
            f"<logger log_dir>/influence (or its dirpath=, or <default_root_dir>/influence without a "
            f"logger). Pass that directory or the {filename} file itself."
        )
    return file


def check_header(record: Any, expected: str, newest: int, where: str) -> None:
    """``ValueError`` unless ``record`` is a dict with ``format == expected`` and a version in ``[1, newest]``."""
    if not isinstance(record, dict) or record.get("format") != expected:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: expected format {expected!r}, found {found!r}.")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: invalid format version {version!r}.")
    if version > newest:
        raise ValueError(
            f"{where}: format version {version} is newer than this lightning-influence reads "
            f"(version {newest}); upgrade lightning-influence."
        )


def json_lines(path: Path, what: str = "record") -> Iterator[tuple[int, str, Any]]:
    """``(line number, raw line, parsed JSON)`` of every non-blank line, read line by line.

    A last line that is not valid JSON (a crash mid-write) is skipped with a warning naming ``what``; an
    invalid line anywhere else raises ``ValueError``.
    """
    bad: tuple[str, Exception] | None = None  # an invalid line: an error unless it is the last one
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            if bad is not None:
                raise ValueError(f"{bad[0]}: not valid JSON ({bad[1]}); the file is corrupt.") from bad[1]
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad = (f"{path}, line {n}", err)
                continue
            yield n, line, record
    if bad is not None:
        warnings.warn(f"{bad[0]}: skipping a truncated last {what} (interrupted write?): {bad[1]}.", stacklevel=3)


def drop_partial_last_line(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write), so the next appended line does not glue onto it."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1  # 0 when the only line is partial
        warnings.warn(
            f"{path}: dropping a partial last line ({size - keep} bytes) left by an interrupted write.", stacklevel=4
        )
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline, then flush and fsync."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary file)`` on a temporary file next to ``path``, fsync it and move it onto ``path``.
    Temporary names start with ``.`` and end with ``.tmp``; the file gets the umask's usual mode."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def move_aside(path: Path, what: str) -> Path | None:
    """Rename a non-empty ``name.ext`` to the first free ``name.<n>.ext`` (with a warning naming ``what``)."""
    if not path.exists() or not path.stat().st_size:
        return None
    n = 1
    while (aside := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, aside)
    warnings.warn(f"{path} held {what} of an earlier run: moved to {aside.name}.", stacklevel=3)
    return aside


class JsonLines:
    """One appended JSON-lines file (windows, audit reports): ``append`` cuts a partial last line once (left by
    a crash mid-write), then appends and fsyncs; ``keep`` rewrites it with a prefix of its lines (a resumed run);
    ``move_aside`` starts a fresh file (a new run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repaired = False

    def append(self, line: str) -> None:
        if not self._repaired:
            drop_partial_last_line(self.path)
            self._repaired = True
        append_line(self.path, line)

    def keep(self, lines: list[str]) -> None:
        """Rewrite the file atomically with ``lines`` (no file: nothing to do)."""
        if self.path.exists():
            atomic_write_text(self.path, "".join(line + "\n" for line in lines))
        self._repaired = True

    def move_aside(self, what: str) -> None:
        move_aside(self.path, what)
        self._repaired = True
