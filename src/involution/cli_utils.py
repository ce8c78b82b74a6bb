"""What the sub-commands of the ``involution`` command line share.

A mistake in the user's input (a missing file, a bad value) is reported as one line on stderr,
``involution: error: ...``, with exit code 2 (argparse's own code for bad arguments), instead of
a traceback (:func:`user_error`). Commands that take a model take it the same way
(:func:`add_model_arguments`, :func:`load_classifier_from_args`). This module imports nothing from
the package at import time, so that every package's ``cli.py`` can use it without a loop
through :mod:`involution.cli`, and ``involution --help`` stays quick.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from involution.models.loading import LoadedModel

__all__ = [
    "USER_ERRORS",
    "LazyChoices",
    "add_command",
    "add_documented_parser",
    "add_model_arguments",
    "csv_list",
    "load_classifier_from_args",
    "user_error",
]

#: Errors caused by the user's input (FileNotFoundError is an OSError): one line, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError, OSError)


def user_error(error: object) -> int:
    """Print ``involution: error: <error>`` on stderr and return the exit code 2.

    A ``KeyError`` is shown by its message, not by its quoted ``repr``.
    """
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"involution: error: {text}", file=sys.stderr)
    return 2


def csv_list(text: str) -> list[str]:
    """An argparse ``type``: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


class LazyChoices(Sequence[str]):
    """An argparse ``choices`` that ``load()`` gives on first use (parsing the option, or
    printing its help), so that building the parser does not import what ``load`` imports.

    Give the option a ``metavar`` (argparse otherwise lists the choices in its usage when the
    option is added) and name the choices in its help with ``%(choices)s``.
    """

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self.load = load

    def _choices(self) -> Sequence[str]:
        return self.load()

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._choices()[index]

    def __len__(self) -> int:
        return len(self._choices())

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices())

    def __contains__(self, value: object) -> bool:
        return value in self._choices()


def add_documented_parser(
    subparsers: Any, name: str, help: str, doc: str
) -> argparse.ArgumentParser:
    """A sub-command parser whose description is ``doc`` less its first paragraph (a module's
    docstring, whose first paragraph is its one-line title), line breaks kept."""
    return subparsers.add_parser(
        name,
        help=help,
        description=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_command(
    subparsers: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    arguments: Callable[[argparse.ArgumentParser], None],
    doc: str | None = None,
) -> argparse.ArgumentParser:
    """Register sub-command ``name``: ``arguments(parser)`` declares its options and
    ``run(args)`` runs it.

    The first paragraph of ``arguments``' docstring is the command's one-line help and the rest
    its description (re-wrapped); given ``doc`` (a module docstring), the description is
    ``doc`` as :func:`add_documented_parser` has it. ``arguments`` may set
    ``parser.description`` itself for a description built at run time.
    """
    title, _, description = inspect.cleandoc(arguments.__doc__ or "").partition("\n\n")
    one_line = " ".join(title.split())
    if doc is not None:
        parser = add_documented_parser(subparsers, name, one_line, doc)
    else:
        parser = subparsers.add_parser(name, help=one_line, description=description or None)
    arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run RUN_DIR`` or ``--model NAME [--weights FILE]``: read by
    :func:`load_classifier_from_args`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a training run directory")
    source.add_argument("--model", metavar="NAME", help="a timm model name (rednet50, ...)")
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="weights for --model: official .pth, converted or our .safetensors",
    )


def load_classifier_from_args(args: argparse.Namespace) -> LoadedModel:
    """The image classifier :func:`add_model_arguments`' options name, in eval mode (through
    :func:`involution.train.loading.load_model`), with its input size and transform."""
    from involution.train.loading import load_model

    if args.run is not None:
        if args.weights is not None:
            raise ValueError("--weights goes with --model; a run brings its own weights")
        loaded = load_model(run=args.run)
    else:
        loaded = load_model(name=args.model, weights=args.weights)
    if loaded.input_size is None or loaded.transform is None:
        raise ValueError(
            f"{args.run or args.model} is not an image classifier: this command takes one"
        )
    return loaded
