"""`python -m flashfuse explain pkg.module:factory`: print what flashfuse does to a model.

The factory is called without arguments and returns `(model, example_inputs)`; example_inputs is a
tuple/list of positional arguments (a single tensor is allowed), or `(model, args, kwargs)`.
The spec may also name a file: `path/to/toy.py:factory`.

Exit codes: 0 done; 2 bad command line or spec; 3 the module does not import or has no such factory;
4 the factory failed or returned something else than (model, inputs); 5 running the model failed;
6 the picture could not be drawn.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import traceback
from typing import Any, Sequence

EXIT_OK, EXIT_USAGE, EXIT_IMPORT, EXIT_FACTORY, EXIT_RUN, EXIT_DRAW = 0, 2, 3, 4, 5, 6

_SPEC_RE = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)$")


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flashfuse",
                                     description="Inspect what the flashfuse torch.compile backend does.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ex = sub.add_parser("explain", help="explain a model built by a factory",
                        description="Build a model with FACTORY() -> (model, example_inputs), run "
                                    "flashfuse's passes on it and print the report.",
                        epilog="exit codes: 0 done, 2 bad command line/spec/option, 3 import failed or "
                               "no such factory, 4 the factory failed or returned something else than "
                               "(model, inputs), 5 running the model failed, 6 drawing failed")
    ex.add_argument("spec", help="pkg.module:factory or path/to/file.py:factory")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.add_argument("--code", action="store_true", help="also print each graph's code before/after")
    ex.add_argument("--draw", metavar="PATH", help="write a picture of the rewritten regions "
                                                    "(.svg, .png, .pdf or .dot)")
    ex.add_argument("--fake", action="store_true", help="run on fake tensors: nothing is computed "
                                                         "(falls back to real inputs where that fails)")
    ex.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="a backend option, e.g. -o remainder=eager -o disable=attention "
                         "(VALUE is JSON, or a plain string; comma-separated for passes/disable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code or 0)
    try:
        if args.command == "explain":
            return _explain(args)
    except CliError as exc:
        message = str(exc)
        message = message[len("flashfuse: "):] if message.startswith("flashfuse: ") else message
        print(f"flashfuse: error: {message}", file=sys.stderr)
        return exc.code
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _explain(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    factory = load_factory(args.spec)
    from flashfuse.config import Config

    try:  # after the import: the factory's module may register passes that the options name
        Config.from_options(options)
    except (TypeError, ValueError) as exc:
        raise CliError(EXIT_USAGE, str(exc)) from None
    model, call_args, call_kwargs = build(factory, args.spec)

    from flashfuse.explain import explain

    try:
        report = explain(model, *call_args, options=options, fake=args.fake, **call_kwargs)
    except Exception as exc:
        raise CliError(EXIT_RUN, _failure("running the model failed", exc)) from None

    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(code=args.code))
    if args.draw:
        try:
            path = report.draw(args.draw)
        except (ImportError, RuntimeError, ValueError, OSError) as exc:
            raise CliError(EXIT_DRAW, f"could not draw {args.draw}: {exc}") from None
        print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CliError(EXIT_USAGE, f"option {item!r} is not KEY=VALUE")
        key = key.strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in ("passes", "disable") and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        options[key] = value
    return options


def load_factory(spec: str) -> Any:
    m = _SPEC_RE.match(spec)
    if not m:
        raise CliError(EXIT_USAGE, f"bad spec {spec!r}: expected pkg.module:factory or path/to/file.py:factory")
    module_name, attr_path = m.group("module"), m.group("attr")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            module = _import_file(module_name)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # `python -m` puts the cwd first; an entry script may not
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except BaseException as exc:  # SyntaxError, SystemExit from a script, ...
        raise CliError(EXIT_IMPORT, _failure(f"cannot import {module_name!r}", exc)) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise CliError(EXIT_IMPORT, f"{module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(EXIT_FACTORY, f"{spec}: {attr_path} is not callable (a factory returning "
                                     f"(model, example_inputs) is expected)")
    return obj


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise CliError(EXIT_IMPORT, f"cannot import {path!r}: no such file")
    name = "_flashfuse_cli_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(EXIT_IMPORT, f"cannot import {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # its sibling imports work
    spec.loader.exec_module(module)
    return module


def build(factory: Any, spec: str) -> tuple[Any, tuple, dict]:
    try:
        built = factory()
    except BaseException as exc:
        raise CliError(EXIT_FACTORY, _failure(f"the factory {spec} failed", exc)) from None
    shape_hint = f"the factory {spec} must return (model, example_inputs) or (model, args, kwargs)"
    if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
        raise CliError(EXIT_FACTORY, f"{shape_hint}; got {type(built).__name__}")
    model, inputs = built[0], built[1]
    kwargs = built[2] if len(built) == 3 else {}
    if not callable(model):
        raise CliError(EXIT_FACTORY, f"{shape_hint}; the model ({type(model).__name__}) is not callable")
    if isinstance(inputs, dict) and len(built) == 2:
        inputs, kwargs = (), inputs
    elif not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    if not isinstance(kwargs, dict):
        raise CliError(EXIT_FACTORY, f"{shape_hint}; kwargs is a {type(kwargs).__name__}, not a dict")
    return model, tuple(inputs), dict(kwargs)


def _failure(what: str, exc: BaseException) -> str:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{what}: {type(exc).__name__}: {exc}\n" + "".join(frames[-6:]).rstrip()
