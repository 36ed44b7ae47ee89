"""Strict dataclass configs, filled from YAML and ``a.b=value`` command-line overrides.

Precedence is defaults < YAML file < command line. Every problem is collected and raised once
as a :class:`ConfigError`: an unknown key names itself and the closest valid key, a wrong type
names the key and the type it expects.

    @dataclass
    class TrainConfig:
        lr: float = 1e-4
        model: ModelConfig = field(default_factory=ModelConfig)

    cfg = parse_args(TrainConfig, ["--config", "run.yaml", "model.width=256"])
    save_config(cfg, run_dir / "config.yaml")

Entry points report a :class:`UserError` (ConfigError is one) without a traceback: ``run_cli(main)``
prints ``PROG: error: MESSAGE`` on stderr and exits with status 2. The ``*_problem`` helpers check the
paths a config or command line names before anything runs, each returning one line or None.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import yaml

from lvd.atomic import atomic_write

T = TypeVar("T")

__all__ = [
    "UserError", "ConfigError", "raise_problems", "run_cli", "from_dict", "to_dict", "parse_args", "load_config",
    "save_config", "folder_problem", "named", "arguments_problems",
]


class UserError(Exception):
    """A problem with what the user asked for (an argument, a config value, a path), not a bug in lvd:
    entry points print its message, which names the key or flag and the value, and exit with status 2."""


class ConfigError(UserError, ValueError):
    """A config that does not fit its schema or cannot work; the message lists every problem."""


def raise_problems(problems: list[str], header: str = "invalid config") -> None:
    """Raise one ConfigError: ``header:`` then one indented line per problem (nothing when there are none)."""
    if problems:
        raise ConfigError(f"{header}:\n  " + "\n  ".join(problems))


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None, *, prog: str,
            user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """``sys.exit(main(argv))``; a UserError (or one of ``user_errors``) becomes ``PROG: error: ...`` and status 2.

    Only these types are caught: any other exception is a bug and keeps its traceback.
    """
    try:
        code = main(argv)
    except (UserError, *user_errors) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return ``value`` as type ``tp``, or record a problem and return it unchanged."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                problems.append(f"{key}: expected {len(args)} items, got {len(value)}")
                return value
            return tuple(_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return value
        return _build(tp, value, key + ".", problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected float, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        problems.append(f"{key}: expected str, got {value!r}")
        return value
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        problems.append(f"{key}: expected a path, got {value!r}")
        return value
    return value


def _build(schema: type[T], data: dict, prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"unknown key '{prefix}{key}'{_closest(str(key), list(fields))}")
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"missing required key '{prefix}{name}'")
    if problems:
        return None  # type: ignore[return-value]
    try:
        return schema(**kwargs)
    except ValueError as err:  # a __post_init__ check of the values (e.g. batch_size >= 1)
        problems.append(f"{prefix.rstrip('.') or schema.__name__}: {err}")
        return None  # type: ignore[return-value]


def from_dict(schema: type[T], data: dict | None) -> T:
    """Build ``schema`` from a nested dict; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    cfg = _build(schema, data or {}, "", problems)
    raise_problems(problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (paths and tuples become str and list), ready for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where it is and what the parser expected."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = "; ".join(filter(None, [getattr(err, "context", None), getattr(err, "problem", None)]))
    return where + (what or str(err).splitlines()[0])


def _load_yaml_file(path: Path) -> dict:
    """The top-level mapping of a YAML file; ConfigError (one line) for a missing, non-UTF-8 or malformed file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded or {}


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults < YAML file at ``path`` < ``a.b=value`` overrides (values parsed as YAML scalars)."""
    data: dict = _load_yaml_file(Path(path)) if path is not None else {}
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override '{item}' is not of the form key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problems.append(f"override '{item}': the value is not valid YAML ({_yaml_problem(err)})")
            continue
        _set_dotted(data, key.strip(), value)
    raise_problems(problems)
    return from_dict(schema, data)


def parse_args(schema: type[T], argv: list[str] | None = None) -> T:
    """Parse ``[--config FILE.yaml] [key.sub=value ...]`` into ``schema``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option '{arg}': use --config FILE.yaml and key.sub=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return load_config(schema, path, overrides)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run folder keeps as ``config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# Paths a config or command line names: checked before anything runs, one line per problem
# --------------------------------------------------------------------------------------------------


def arguments_problems(key: str, arguments: dict, fn: Callable) -> list[str]:
    """One line per name in ``arguments`` that ``fn`` does not take (e.g. ``model.overrides`` for a model class),
    with the closest argument it does take."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    valid = [name for name in params if name != "self"]
    return [f"{key}.{name}: not an argument of {fn.__qualname__.split('.')[0]}{_closest(name, valid)}"
            for name in arguments if name not in valid]


def named(key: str, value: Any) -> str:
    """How a problem names its input: ``--out x`` for a flag, ``run.dir='x'`` for a config key."""
    return f"{key} {value}" if key.startswith("-") else f"{key}={str(value)!r}"


def folder_problem(key: str, value: str | Path, folder: str | Path | None = None) -> str | None:
    """Why ``folder`` (default ``value``; existing, or to be created with its parents) cannot take output, or None.

    Creating and removing an empty probe folder in the nearest existing ancestor is the test: permission
    bits say nothing for root, and places like /proc refuse new folders whatever the bits say.
    """
    folder = Path(value if folder is None else folder)
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.absolute().parent
    if not ancestor.is_dir():
        return f"{named(key, value)}: cannot write into {ancestor}: it is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lvd-write-probe-", dir=ancestor))
    except OSError as err:
        return f"{named(key, value)}: cannot write into {ancestor} ({err.strerror or err})"
    return None
