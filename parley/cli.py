"""The `parley` command line."""

import click


@click.group()
@click.version_option(package_name="parley")
def cli() -> None:
    """Maintain and run Parley distributions."""


from parley.engine import engine  # noqa: E402  (the `parley engine` subgroup lives in its own room)

cli.add_command(engine)
