"""The one error and exit-status convention of the three CLIs (trainer, audit, rewards).

Exit status
  0  the command did all its work, and whatever it checked is sound.
  1  the command ran and found a failure: a store that does not verify (``trainer verify-store``),
     a run that failed or could not be audited (``audit run``), a verdict or bundle that does not
     check out, a posted root that does not match its inputs (``rewards verify-root``). The finding
     goes to stdout: a ``FAIL ...`` line, or a table followed by the exit.
  2  bad input, usage or setup; nothing was done, nothing is left half-written. Exactly one line
     on stderr, ``error: <what was expected, what was seen>``, and no traceback unless the group's
     ``-v`` is given (then the traceback comes first, the line last). Every
     :class:`~proofs.errors.VeritrainError` and ``OSError`` that escapes a command ends here, as
     does :class:`BadInput`. click's own usage errors (a missing option, a value of the wrong
     type) are 2 as well, printed by click with the usage line and ``Error: ...``.
  3  partial success: ``rewards ingest`` wrote its batch but rejected some records (listed on
     stderr).
Anything else (a traceback without ``-v``, or exit 1 from Python itself) is a bug in veritrain.

Commands opt in by their class: each CLI's group is a :class:`Group` (its commands are
:class:`Command` by default), and a command defined on its own (``rewards.settlement_cli``) names
``cls=Command``, so that it keeps the convention when invoked directly as well. Messages are made
one line of plain text by :func:`one_line` (peers choose run ids, paths and reasons: a newline or
an ANSI escape in one must neither split the line nor redraw the screen) and printed with
``click.echo``, never as rich markup.

Why this lives in ``trainer`` and not in ``proofs``: ``proofs`` is the cryptography layer and has
no command line; a CLI convention there would pull click into it for nothing. ``trainer`` is the
lowest package with a CLI, and ``audit`` and ``rewards`` may import it (layers point down).
Importing this module does not import torch (``trainer/__init__.py`` is empty).
"""

from __future__ import annotations

import errno
import functools
import traceback
from collections.abc import Callable
from typing import Any, Final, NoReturn, TypeVar

import click

from proofs.errors import VeritrainError

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_PARTIAL: Final = 3
PREFIX: Final = "error:"
EPILOG: Final = (
    "Exit status: 0 done; 1 it ran and found a failure (reported on stdout); 2 bad input, usage "
    "or setup (one 'error: ...' line on stderr, the traceback too with -v); 3 partial success "
    "(rewards ingest: some records rejected)."
)

T = TypeVar("T")


class BadInput(click.ClickException):
    """Bad input, usage or setup: ``error: <message>`` on stderr, exit 2."""

    exit_code = EXIT_BAD_INPUT


class Failed(click.ClickException):
    """The command ran and found a failure: ``FAIL <message>`` on stdout, exit 1."""

    exit_code = EXIT_FAILED

    def show(self, file: Any = None) -> None:  # only reached outside a Command
        click.echo(f"FAIL {one_line(self.format_message())}", file=file)


def one_line(text: object) -> str:
    """``text`` on one line: whitespace runs (line breaks included) become one space, and any
    other non-printable character (an ANSI escape, a bidi override) is written as its Python
    escape, so that a peer's string prints as data."""
    words = " ".join(str(text).split())
    if words.isprintable():
        return words
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in words)


def _verbose(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("verbose"))


def report_errors(ctx: click.Context, work: Callable[[], T]) -> T:
    """``work()``, with its errors turned into the exit convention above."""
    try:
        return work()
    except Failed as exc:
        click.echo(f"FAIL {one_line(exc.format_message())}")
        ctx.exit(EXIT_FAILED)
    except click.UsageError:
        raise  # click prints the usage line, a hint and the message itself (exit 2)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # stdout closed by the reader (`| head`): click's main exits quietly
        _bad_input(ctx, exc, str(exc))
    except click.ClickException as exc:
        _bad_input(ctx, exc, exc.format_message())
    except VeritrainError as exc:
        _bad_input(ctx, exc, str(exc))


def _bad_input(ctx: click.Context, exc: BaseException, message: str) -> NoReturn:
    if _verbose(ctx):
        click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
    click.echo(f"{PREFIX} {one_line(message)}", err=True)
    ctx.exit(EXIT_BAD_INPUT)


class Command(click.Command):
    """A command that follows the exit convention, however it is invoked."""

    def invoke(self, ctx: click.Context) -> Any:
        return report_errors(ctx, functools.partial(super().invoke, ctx))


class Group(click.Group):
    """A CLI's top group: its commands are :class:`Command`, and anything raised by the group
    itself, or by a command of another class added to it, follows the convention too."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EPILOG)  # the convention, in every CLI's --help
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        return report_errors(ctx, functools.partial(super().invoke, ctx))
