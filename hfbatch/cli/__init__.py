"""Command line: the typer app, assembled from the command modules (the only layer that knows a terminal)."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import data, registry, serve, submit
from .options import EXIT_CODES_HELP

app = typer.Typer(
    name="hfbatch",
    help="Run OpenAI Batch API files against Hugging Face Inference Providers.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"hfbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print hfbatch's version and exit.")] = False,
) -> None:
    pass


app.command(epilog=EXIT_CODES_HELP)(submit.submit)
app.command(epilog=EXIT_CODES_HELP)(submit.resume)
app.command()(submit.estimate)
app.command("list")(registry.list_)
app.command()(registry.status)
app.command()(registry.cancel)
app.command()(registry.wait)
app.command()(registry.results)
app.command()(data.prepare)
app.command()(data.merge)
app.command()(serve.serve)
app.add_typer(registry.cache_app, name="cache")
app.command("fake-provider", hidden=True)(serve.fake_provider)
app.command("fake-hub", hidden=True)(serve.fake_hub)
