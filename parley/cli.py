"""The `parley` command line."""

import click


@click.group()
@click.version_option(package_name="parley")
def cli() -> None:
    """Maintain and run Parley distributions."""
