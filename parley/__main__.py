"""`python -m parley`: the same as the `parley` command."""

from parley.cli import cli

if __name__ == "__main__":
    cli()
