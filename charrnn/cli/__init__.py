"""The `charrnn` command line: the Typer app, its commands registered in the order `--help` lists them.

One module per command group (train, sample, evaluate, checkpoints, corpus, cache, neuron, bench); the shared
choices and option types are in options.py, the error decorator in errors.py. A command parses its
options, calls one library function and renders the result through charrnn.ui. torch is imported
inside the commands, so `charrnn --help` starts fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from charrnn import __version__
from charrnn.cli import bench, evaluate, sample, train
from charrnn.cli import export, startup
from charrnn.cli.cache import cache_app
from charrnn.cli.checkpoints import checkpoints_app
from charrnn.cli.corpus import corpus_app
from charrnn.cli.neuron import neuron_app
from charrnn.cli.plot import plot
from charrnn.cli.serve import serve

app = typer.Typer(
    help="Train character-level recurrent language models, sample from them, and steer them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(train.train)
app.command()(sample.sample)
app.command("eval")(evaluate.eval_cmd)
app.command()(evaluate.gradients)
app.command()(bench.bench)
app.command()(plot)
app.command("export")(export.export_cmd)
app.command()(serve)
app.add_typer(checkpoints_app, name="checkpoints")
app.add_typer(corpus_app, name="corpus")
app.add_typer(cache_app, name="cache")
app.add_typer(neuron_app, name="neuron")


def _version(value: bool):
    if value:
        print(f"charrnn {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """Train character-level recurrent language models, sample from them, and steer them."""


_OWN_PROCESS = False  # main() runs the app as the whole process
_EXIT_WITHOUT_SHUTDOWN = False  # set by `train` (see there)


def main() -> None:
    """Run the app; a usage error (bad option, bad value) is one plain line and exit code 2."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    startup.hold()  # collection waits until the command has started (startup.py)
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # the parser's own errors carry a message and an exit code
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            code = 0
            print(e.format_message(), file=sys.stderr)
        else:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {e.format_message()}{where}", file=sys.stderr)
            code = e.exit_code
    except (KeyboardInterrupt, EOFError):
        print("error: interrupted", file=sys.stderr)
        code = 130
    code = code if isinstance(code, int) else 0
    if _EXIT_WITHOUT_SHUTDOWN:  # everything is saved and closed; nothing is left for atexit to do
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
