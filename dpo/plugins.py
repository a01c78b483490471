"""A user's own function named on the command line: "pkg.module:function" or "path/to/file.py:function".

User losses (--loss) and user judges (--judge) are loaded here, so both take the same spellings and fail alike: one
line naming the spec and what is wrong (no such file or module, no such function, not callable, the file raised).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from dpo.errors import UserError, first_line


def is_function_spec(spec: str) -> bool:
    """Whether `spec` names a function ("module:function" or "file.py:function")."""
    target, _, name = spec.rpartition(":")
    return bool(target) and name.isidentifier()


def load_function(spec: str, what: str, error: type[UserError],
                  arguments: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The function `spec` names; `what` ("loss", "judge") and `error` shape the one-line errors. `arguments`: the
    names of what it is called with, checked against its signature now rather than at its first call."""
    fn = _load(spec, what, error)
    if arguments:
        try:  # the signature of what is called: a decorator's wrapper, not the function it wraps
            signature = inspect.signature(fn, follow_wrapped=False)
        except Exception:  # a builtin without a signature, an annotation that cannot be evaluated: called as it is
            return fn
        try:
            signature.bind(*arguments)
        except TypeError as err:
            name = getattr(fn, "__name__", spec.rsplit(":", 1)[1])
            raise error(f"{what} {spec!r}: it is called as {name}({', '.join(arguments)}), which its signature does "
                        f"not take ({err})") from None
    return fn


@lru_cache(maxsize=None)
def _load(spec: str, what: str, error: type[UserError]) -> Callable[..., Any]:
    target, function_name = spec.rsplit(":", 1)
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _load_file(spec, target, what, error) if is_file else _import_module(spec, target, what, error)
    fn = getattr(module, function_name, None)
    if fn is None:
        raise error(f"{what} {spec!r}: {target} has no function {function_name!r}")
    if not callable(fn):
        raise error(f"{what} {spec!r}: {target}.{function_name} is not callable")
    return fn


def _load_file(spec: str, path_text: str, what: str, error: type[UserError]) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise error(f"{what} {spec!r}: no such file {path_text}")
    # a stable, unique module name so dataclasses and pickling inside the file work
    module_name = f"dpo_user_{what}_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {spec!r}: cannot load {path_text} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise error(f"{what} {spec!r}: loading {path_text} failed: {type(err).__name__}: {first_line(err)}") from None
    return module


def _import_module(spec: str, module_name: str, what: str, error: type[UserError]) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise error(f"{what} {spec!r}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # the module raised while it was imported (a bug in it, a syntax error)
        raise error(f"{what} {spec!r}: importing {module_name} failed: {type(err).__name__}: {first_line(err)}"
                    ) from None
