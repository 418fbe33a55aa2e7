"""parley: the maintainer CLI of the platform (cards, generated wiring, checks, running a distribution)."""
