"""File habits shared by every artifact the package writes (windows, final scores, the audit, the trajectory).

- Appended JSON lines are flushed and fsynced one by one; a crash leaves at most a partial last line, which
  readers skip with a warning and writers cut before appending again.
- Whole files are written to a temporary file next to the target, fsynced and moved onto it: a file is
  either its old self or whole. Many small files made durable together may defer their fsyncs to one
  :func:`sync_files` call (``atomic_write(..., sync=False)``).
- Every record carries ``format`` and ``version``; a reader refuses another format or a newer version.
- A folder a run writes holds a lock file while it does (:class:`FolderLock`): created exclusively, naming the
  process; a second live writer is refused, a lock whose process has died is stale and taken over.
- A ``torch.save`` file that cannot be read back raises :class:`~lightning_influence.errors.DamagedFileError`
  naming the file (:func:`load_torch_file`).

Nothing here knows Lightning.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import torch

from lightning_influence.errors import DamagedFileError, FolderInUseError

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


def atomic_write(path: Path, write: Callable[[Any], None], sync: bool = True) -> None:
    """Call ``write(binary file)`` on a temporary file next to ``path``, fsync it and move it onto ``path``.
    Temporary names start with ``.`` and end with ``.tmp``; the file gets the umask's usual mode.

    ``sync=False`` skips the fsync: the move is still atomic for every reader (a crash of the process leaves the old
    file or the whole new one), but after a crash of the machine the new file may be empty until
    :func:`sync_files` has run on it. A writer that makes many small files durable together (a trajectory's
    per-step batches, at its next checkpoint) calls that once for all of them."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sync_files(paths: Iterable[Path]) -> None:
    """fsync each of ``paths`` (files written with ``atomic_write(..., sync=False)``); a file that is gone (a run
    cut back since) is skipped."""
    for path in paths:
        try:
            f = open(path, "rb+")  # noqa: SIM115 - closed below; a writable handle, which fsync needs on Windows
        except FileNotFoundError:
            continue
        with f:
            os.fsync(f.fileno())


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


def load_torch_file(path: Path, fix: str, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``; a file that is not a whole ``torch.save`` file (truncated,
    overwritten, empty) raises :class:`~lightning_influence.errors.DamagedFileError` naming it, with ``fix`` (what
    to do instead). A missing or unreadable file raises the operating system's error as usual."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, KeyError...
        text = str(err).split(". ", 1)[0] if "central directory" in str(err) else ""
        reason = f"truncated ({text})" if text else f"not a whole torch.save file ({type(err).__name__})"
        size = path.stat().st_size if path.is_file() else 0
        raise DamagedFileError(
            f"{path}: the file is damaged ({size} bytes, {reason}): it was cut short or overwritten after it was"
            f" written, and cannot be read. {fix}"
        ) from None  # torch's own message would suggest weights_only=False: never load these files unsafely


LOCK_FORMAT = "lightning-influence/lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


class FolderLock:
    """A lock file (``path``) that says a live process writes the folder it sits in.

    :meth:`acquire` creates it exclusively (a hard link of a complete temporary file: never seen half written)
    with this process's id, host and start time; :meth:`release` removes it. A lock left by a process that no
    longer runs on this host (a crash, ``kill -9``) is stale: taken over with a warning. A live holder (another
    process, or another holder in this process) makes :meth:`acquire` raise
    :class:`~lightning_influence.errors.FolderInUseError` with ``what`` and ``fix`` in the message.
    """

    # the locks this process holds, by absolute path; a holder dropped without release() (its owner garbage
    # collected) leaves the registry, and its file becomes stale
    _held: weakref.WeakValueDictionary[str, FolderLock] = weakref.WeakValueDictionary()

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.held = False

    @property
    def key(self) -> str:
        return os.path.abspath(self.path)

    def acquire(self, fix: str) -> None:
        """Take the lock (idempotent); ``FolderInUseError`` naming the holder and ``fix`` when a live run holds it."""
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": LOCK_FORMAT, "version": 1, "pid": os.getpid(), "host": socket.gethostname()}
        record.update(started=datetime.datetime.now().isoformat(timespec="seconds"), what=self.what)
        tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    holder = lock_holder(self.path)
                    if holder is not None:
                        raise FolderInUseError(
                            f"{self.path.parent} is in use: {holder} ({self.path} exists). Two runs must not share"
                            f" {self.what}: their files would interleave or overwrite each other. {fix} If no run"
                            f" writes there any more (e.g. it ran on another machine and died), delete {self.path}."
                        ) from None
                    warnings.warn(f"{self.path}: taking over a stale lock ({_describe(self.path)}).", stacklevel=3)
                    self.path.unlink(missing_ok=True)
            else:
                raise FolderInUseError(
                    f"{self.path}: could not take the lock; another run keeps taking it. Give this run its own folder."
                )
        finally:
            tmp.unlink(missing_ok=True)
        self.held = True
        FolderLock._held[self.key] = self

    def release(self) -> None:
        """Remove the lock file (idempotent; a lock that another process took over meanwhile is left alone)."""
        if not self.held:
            return
        self.held = False
        if FolderLock._held.get(self.key) is self:
            del FolderLock._held[self.key]
        record = _read_lock(self.path)
        if record is None or (record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()):
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(path: Path) -> str:
    record = _read_lock(path) or {}
    pid, host, started = record.get("pid"), record.get("host"), record.get("started")
    return f"process {pid} on {host}, since {started}"


def lock_holder(path: Path, this_process: bool = True) -> str | None:
    """Who holds the lock file ``path``, in words (``"a run of process 123 on host, since ... writes it"``), or None
    when nobody does: no file, or a stale one (its process no longer runs on this host; an unreadable file is taken
    as stale). A lock of another host is taken as held: this process cannot tell. ``this_process=False``: a holder
    in this very process is not reported."""
    if not path.exists():
        return None
    record = _read_lock(path)
    if record is None or not isinstance(record.get("pid"), int):
        return None
    pid, host = int(record["pid"]), record.get("host")
    if host == socket.gethostname():
        if pid == os.getpid():
            if not this_process or os.path.abspath(path) not in FolderLock._held:
                return None  # not asked for, or left by a holder of this process that was never released: stale
        elif not _process_alive(pid):
            return None
    return f"a run of {_describe(path)} writes it"
