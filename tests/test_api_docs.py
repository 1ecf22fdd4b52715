"""docs/api.md against the code: every documented signature is the real one, and the public API is documented.

The convention, in docs/api.md: a *signature block* is a fenced ``python`` block on the line right after
``<!-- signatures -->``. It holds one entry per logical line (an entry may go on over several lines inside its
brackets; ``#`` comments and blank lines are ignored):

- ``from <module> import <names>``: binds names for the entries after it, in that block (and must import);
- ``Name.path(parameters) -> return``: a class (its constructor), a function or a method. The parameter names,
  their order, their kinds (positional, ``*args``, keyword-only after ``*``, ``**kwargs``) and their defaults
  must be those of ``inspect.signature`` of the real object (``self`` left out); the return annotation is for
  the reader and is not compared;
- ``Name.path -> type``: a property (or another attribute that is not called).

An entry's first name is a name of ``lightning_influence.__all__``, a name the block imported above it, or the
full dotted path of a module of the package (``lightning_influence.records.MicroBatch(...)``).

Completeness: every public name has an entry, and so has every public method and property the package defines on
a public class (Lightning's hooks, dataclass fields and the members of the package's protocols left out). Besides
the blocks: the exceptions table lists each error with its real bases, the deprecated top-level names warn and are
the objects of the rooms the table names; and anywhere under docs/, every ``lightning_influence.<dotted.path>``,
``lightning_influence/<file>.py``, ``tests/<file>.py::<test>`` and code span naming a ``.py`` file exists (0.1.0's
flat module paths still import, with a warning, but a doc must name the room). Nothing here trains.
"""

from __future__ import annotations
import __future__

import ast
import dataclasses
import functools
import importlib
import inspect
import io
import pkgutil
import re
import tokenize
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_influence

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.md"
MARKER = "<!-- signatures -->"
PACKAGE = "lightning_influence"
PUBLIC = {name: getattr(lightning_influence, name) for name in lightning_influence.__all__}


class Entry(NamedTuple):
    text: str  # the entry as written, continuation lines joined
    line: int  # its first line in docs/api.md
    imports: tuple[str, ...]  # the block's import statements above it

    @property
    def target(self) -> str:
        return self.text.split("(", 1)[0].split("->", 1)[0].strip()

    @property
    def where(self) -> str:
        return f"docs/api.md:{self.line}: {' '.join(self.text.split())}"


def _blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every signature block."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```python", (
            f"docs/api.md:{i + 1}: {MARKER} needs a ```python fence on the next line"
        )
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"docs/api.md:{i + 2}: unclosed signature block"
        blocks.append((i + 3, "\n".join(lines[i + 2 : end])))
    return blocks


LAYOUT_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)


def _logical_lines(body: str) -> list[tuple[int, str]]:
    """(offset of the first line, source text) of each logical line of a block: brackets continue a line."""
    lines, out = body.splitlines(), []
    first: tuple[int, int] | None = None  # (row, column) where the logical line starts
    last = (0, 0)  # and where its last token ends
    for token in tokenize.generate_tokens(io.StringIO(body + "\n").readline):
        if token.type == tokenize.NEWLINE and first is not None:
            (r0, c0), (r1, c1) = first, last
            text = "\n".join(lines[r0 - 1 : r1])
            out.append((r0 - 1, text[c0 : len(text) - len(lines[r1 - 1]) + c1]))
            first = None
        elif token.type not in LAYOUT_TOKENS:
            first, last = first or token.start, token.end
    return out


def _parse() -> tuple[list[Entry], list[tuple[int, str]]]:
    """The entries of every signature block, and its import statements with their line numbers."""
    entries: list[Entry] = []
    statements: list[tuple[int, str]] = []
    for first, body in _blocks(API.read_text(encoding="utf-8")):
        imports: list[str] = []
        for offset, text in _logical_lines(body):
            if text.startswith(("from ", "import ")):
                imports.append(text)
                statements.append((first + offset, text))
            elif text.startswith("->") and entries:  # a return annotation on a line of its own
                entries[-1] = entries[-1]._replace(text=f"{entries[-1].text} {text}")
            else:
                entries.append(Entry(text, first + offset, tuple(imports)))
    return entries, statements


ENTRIES, IMPORTS = _parse()


def _namespace(entry: Entry) -> dict[str, Any]:
    namespace: dict[str, Any] = {"torch": torch, **PUBLIC}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for statement in entry.imports:
            exec(statement, namespace)  # noqa: S102 - the doc's own import lines
    return namespace


def _module(name: str) -> Any:
    """The module ``name`` itself: 0.1.0's flat paths (``lightning_influence.engine``) still import, with a warning,
    but hand out the module of their room, which a doc must name instead."""
    module = importlib.import_module(name)
    if module.__name__ != name:
        raise ImportError(f"{name} is a deprecated alias of {module.__name__}")
    return module


def _import_path(dotted: str, strict: bool = False) -> Any:
    """The object at ``lightning_influence.<module>.<attributes>``: the longest importable module, then attributes.
    ``strict``: a deprecated top-level name fails too."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = _module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error" if strict else "ignore", DeprecationWarning)
            for name in parts[cut:]:
                obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def _resolve(entry: Entry) -> tuple[Any, Any, str]:
    """(owner, object, last name) of an entry's target; owner is the class or module holding it (None for a bare
    name)."""
    namespace = _namespace(entry)
    head, *rest = entry.target.split(".")
    if head == PACKAGE:
        owner = _import_path(".".join([head, *rest[:-1]])) if rest[:-1] else lightning_influence
        return owner, _import_path(entry.target), rest[-1]
    assert head in namespace, f"{entry.where}: {head!r} is neither public nor imported in the block"
    owner, obj = None, namespace[head]
    for name in rest:
        owner, obj = obj, getattr(obj, name)
    return owner, obj, (rest or [head])[-1]


def _real_signature(entry: Entry) -> inspect.Signature:
    owner, obj, name = _resolve(entry)
    if not inspect.isclass(owner):
        return inspect.signature(obj)
    raw = inspect.getattr_static(owner, name)
    assert not isinstance(raw, property), f"{entry.where}: {name} is a property, document it without parentheses"
    signature = inspect.signature(obj)
    if inspect.isclass(obj) or isinstance(raw, (staticmethod, classmethod)):
        return signature
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # self


def _documented_signature(entry: Entry) -> inspect.Signature:
    arguments = entry.text[len(entry.target) :]
    source = f"def _documented{arguments}:\n    pass\n"
    flags = __future__.annotations.compiler_flag  # annotations stay text: `scores: Tensor[k]` need not resolve
    namespace = _namespace(entry)
    exec(compile(source, entry.where, "exec", flags=flags, dont_inherit=True), namespace)  # noqa: S102
    return inspect.signature(namespace["_documented"])


def _real_default(parameter: inspect.Parameter, owner: Any) -> Any:
    """A dataclass field's default factory (shown as ``<factory>``) stands for the value it makes."""
    if dataclasses.is_dataclass(owner) and inspect.isclass(owner):
        for field in dataclasses.fields(owner):
            if field.name == parameter.name and field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
    return parameter.default


def _same_default(documented: Any, real: Any) -> bool:
    if documented is inspect.Parameter.empty or real is inspect.Parameter.empty:
        return documented is real
    if isinstance(documented, bool) or isinstance(real, bool):
        return type(documented) is type(real) and documented == real
    try:
        return bool(documented == real)
    except Exception:  # noqa: BLE001 - tensors and other objects without a plain ==
        return documented is real


def _check_entry(entry: Entry) -> None:
    if "(" not in entry.text:  # an attribute: a property or a plain, non-callable value
        owner, obj, name = _resolve(entry)
        raw = inspect.getattr_static(owner, name) if inspect.isclass(owner) else obj
        assert isinstance(raw, property) or not callable(raw), f"{entry.where}: a method, document its parameters"
        return
    real, documented = _real_signature(entry), _documented_signature(entry)
    owner, obj, _ = _resolve(entry)
    cls = obj if inspect.isclass(obj) else owner

    def shape(signature: inspect.Signature) -> list[tuple[str, str]]:
        return [(p.name, p.kind.description) for p in signature.parameters.values()]

    assert shape(documented) == shape(real), f"{entry.where}\n  documented: {documented}\n  real:       {real}"
    for doc, code in zip(documented.parameters.values(), real.parameters.values()):
        assert _same_default(doc.default, _real_default(code, cls)), (
            f"{entry.where}\n  default of {doc.name}: documented {doc.default!r}, real {code.default!r}"
        )


def test_api_md_has_signature_blocks():
    assert len(ENTRIES) > 80, "docs/api.md lost its signature blocks (see this file's docstring)"
    assert API.read_text(encoding="utf-8").count(MARKER) == len(_blocks(API.read_text(encoding="utf-8")))


@pytest.mark.parametrize(("line", "statement"), IMPORTS, ids=[f"line{line}" for line, _ in IMPORTS])
def test_documented_imports_work(line, statement):
    node = ast.parse(statement).body[0]
    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    for name in names:
        _module(name)  # the rooms, not 0.1.0's module paths
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # nor the deprecated top-level names
        exec(statement, {})  # noqa: S102


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.target for e in ENTRIES])
def test_documented_signature_is_the_real_one(entry):
    _check_entry(entry)


def test_every_signature_is_documented_once():
    seen: dict[str, int] = {}
    for entry in ENTRIES:
        assert entry.target not in seen, f"{entry.where}: documented again (first at line {seen[entry.target]})"
        seen[entry.target] = entry.line


def _documented_objects() -> dict[tuple[int, str], Entry]:
    """(id of owner or object, member name or '') -> entry, for every documented target."""
    out = {}
    for entry in ENTRIES:
        try:
            owner, obj, name = _resolve(entry)
        except (AssertionError, AttributeError, ImportError):
            continue  # test_documented_signature_is_the_real_one reports it
        out[(id(obj), "")] = entry
        if inspect.isclass(owner):
            out[(id(owner), name)] = entry
    return out


def _is_error(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def test_every_public_name_has_a_signature():
    documented = _documented_objects()
    missing = [
        name
        for name, obj in PUBLIC.items()
        if callable(obj)
        and not _is_error(obj)
        and obj is not lightning_influence.TrackerConfig
        and (id(obj), "") not in documented
    ]
    assert not missing, f"public names without a signature block entry in docs/api.md: {missing}"


@functools.lru_cache(maxsize=None)
def _protocol_members() -> frozenset[str]:
    """Members of the package's protocols (window sinks, step consumers): plumbing between rooms, not user API."""
    names: set[str] = set()
    for info in pkgutil.walk_packages(lightning_influence.__path__, PACKAGE + "."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and getattr(obj, "_is_protocol", False) and obj.__module__ == module.__name__:
                names |= {n for n in vars(obj) if not n.startswith("_")}
    return frozenset(names)


def _public_members(cls: type) -> dict[str, type]:
    """Public members the package defines on ``cls`` (by name -> the class in the MRO defining it), leaving out
    Lightning's callback hooks, dataclass fields and protocol members."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    skip = fields | _protocol_members() | set(dir(Callback))
    members = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith(PACKAGE):
            continue
        for name in vars(klass):
            if not name.startswith("_") and name not in skip:
                members[name] = klass
    return members


@pytest.mark.parametrize(
    "name", [n for n, o in PUBLIC.items() if inspect.isclass(o) and not _is_error(o) and n != "TrackerConfig"]
)
def test_every_public_method_and_property_is_documented(name):
    cls, documented = PUBLIC[name], _documented_objects()
    missing = [
        member
        for member, defined_by in _public_members(cls).items()
        if not any((id(k), member) in documented for k in cls.__mro__[: cls.__mro__.index(defined_by) + 1])
    ]
    assert not missing, f"{name}: members without an entry `{name}.<member>` in a signature block: {missing}"


def test_tracker_config_fields_are_the_tracker_arguments():
    """api.md: TrackerConfig's fields are InfluenceTracker's arguments, in the same order."""
    fields = [f.name for f in dataclasses.fields(lightning_influence.TrackerConfig)]
    assert fields == list(inspect.signature(lightning_influence.InfluenceTracker).parameters)
    assert "`TrackerConfig`" in API.read_text(encoding="utf-8")


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` in docs/api.md, as lists of cells."""
    text = API.read_text(encoding="utf-8")
    assert heading in text, f"docs/api.md has no section {heading!r}"
    rows = []
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [r for r in rows[2:]]  # the header and its rule


def test_exceptions_table_lists_every_error_with_its_bases():
    rows = {re.findall(r"`(\w+)`", r[0])[0]: set(re.findall(r"`(\w+)`", r[1])) for r in _table("## Exceptions")}
    errors = {name: obj for name, obj in PUBLIC.items() if _is_error(obj)}
    assert set(rows) == set(errors), "the exceptions table and the public errors differ"
    for name, cls in errors.items():
        assert rows[name] == {b.__name__ for b in cls.__bases__}, f"{name}: documented bases {rows[name]}"
        assert issubclass(cls, lightning_influence.InfluenceError)


def test_deprecated_names_warn_and_are_the_rooms_objects():
    rows = _table("## Deprecated top-level names")
    assert rows, "no deprecated names documented"
    for row in rows:
        name, module = re.findall(r"`([\w.]+)`", row[0])[0], re.findall(r"`([\w.]+)`", row[1])[0]
        assert name not in lightning_influence.__all__
        with pytest.warns(DeprecationWarning, match=module.replace(".", r"\.")):
            old = getattr(lightning_influence, name)
        assert old is getattr(importlib.import_module(module), name), f"{name} is not {module}.{name}"


DOTTED = re.compile(r"\blightning_influence(?:\.[A-Za-z_]\w*)+")
FILES = re.compile(r"\blightning_influence/[\w/]*\w\.py\b")


def _mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    found = set()
    for path in sorted(DOCS.glob("*.md")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found |= {(m.group(0).rstrip("."), f"{path.relative_to(ROOT)}:{number}") for m in pattern.finditer(line)}
    return sorted(found)


@pytest.mark.parametrize(("dotted", "where"), _mentions(DOTTED))
def test_dotted_paths_in_docs_exist(dotted, where):
    try:
        _import_path(dotted, strict=True)
    except (ImportError, AttributeError, DeprecationWarning) as err:
        pytest.fail(f"{where}: {dotted} does not exist ({err})")


@pytest.mark.parametrize(("path", "where"), _mentions(FILES))
def test_module_files_in_docs_exist(path, where):
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"


def test_the_first_block_imports_every_public_name():
    line, statement = IMPORTS[0]
    node = ast.parse(statement).body[0]
    assert isinstance(node, ast.ImportFrom) and node.module == PACKAGE, f"docs/api.md:{line}: not the public import"
    assert sorted(a.name for a in node.names) == sorted(lightning_influence.__all__)


TESTS = re.compile(r"\btests/[\w/]+\.py(?:::\w+)?")


@pytest.mark.parametrize(("reference", "where"), _mentions(TESTS))
def test_tests_named_in_docs_exist(reference, where):
    path, _, name = reference.partition("::")
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    if name:
        assert re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), (
            f"{where}: {path} has no test {name}"
        )


SPAN_FILE = re.compile(r"`([\w./-]+\.py)`")
FILE_ROOTS = ("", "lightning_influence", "benchmarks", "examples", "tests", "docs")
OTHER_PROJECTS = {"peers.md"}  # names files of the libraries it compares with


def _file_spans() -> list[tuple[str, str]]:
    return [
        (path, where)
        for path, where in _mentions(SPAN_FILE)
        if where.split(":")[0].split("/")[-1] not in OTHER_PROJECTS
    ]


@pytest.mark.parametrize(("span", "where"), _file_spans())
def test_python_files_named_in_docs_exist(span, where):
    """A code span naming a .py file names a file of the repository (or of the package, relative to it): 0.1.0's flat
    modules (`engine.py`, `clipping.py`) are gone."""
    path = span.strip("`")
    assert any((ROOT / base / path).is_file() for base in FILE_ROOTS), f"{where}: no file {path}"
