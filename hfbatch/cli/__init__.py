"""Command line: the typer app, assembled from the command modules (the only layer that knows a terminal)."""

from __future__ import annotations

import typer

from . import registry, serve, submit
from .options import EXIT_CODES_HELP

app = typer.Typer(
    name="hfbatch",
    help="Run OpenAI Batch API files against Hugging Face Inference Providers.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

app.command(epilog=EXIT_CODES_HELP)(submit.submit)
app.command(epilog=EXIT_CODES_HELP)(submit.resume)
app.command()(submit.estimate)
app.command("list")(registry.list_)
app.command()(registry.status)
app.command()(registry.cancel)
app.command()(registry.wait)
app.command()(registry.results)
app.command()(serve.serve)
app.add_typer(registry.cache_app, name="cache")
app.command("fake-provider", hidden=True)(serve.fake_provider)
app.command("fake-hub", hidden=True)(serve.fake_hub)
