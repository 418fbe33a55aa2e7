"""Where things live in a Parley checkout: the repository root, its cards and its distributions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from parley.cards import Card, CardError, load_card

OVERRIDE = "docker-compose.override.yml"
# The overlays of a distribution, in the order `docker compose -f` takes them after the override;
# postgres.yml moves the agents' state to a shared PostgreSQL (parley/state_overlay.py);
# autoscaler.yml adds a Swarm stack's autoscaler (parley/autoscaler_overlay.py); monitoring.yml adds
# Prometheus, scraping every service (parley/monitoring_overlay.py).
OVERLAYS = ("dev.yml", "cpu.yml", "proxy.yml", "postgres.yml", "autoscaler.yml", "monitoring.yml")
BASE_COMPOSE = "docker-compose.yml"
# A distribution's pipeline (Dream's pipeline_conf.json): the agent's services and their order.
PIPELINE = "pipeline_conf.json"


class RepoError(RuntimeError):
    """The repository is not where or what we expect; the message says how to fix it."""


@dataclass(frozen=True)
class Repo:
    root: Path

    @classmethod
    def find(cls, start: Path | None = None) -> "Repo":
        """The checkout holding `start` (default: the working directory), else the one holding this package."""
        for candidate in [Path(start or Path.cwd()).resolve(), *Path(start or Path.cwd()).resolve().parents]:
            if (candidate / "components").is_dir() and (candidate / "assistant_dists").is_dir():
                return cls(candidate)
        package_checkout = Path(__file__).resolve().parents[1]
        if (package_checkout / "assistant_dists").is_dir():
            return cls(package_checkout)
        raise RepoError("not inside a Parley checkout (no components/ and assistant_dists/ here or above): cd into one or pass --repo")

    def path(self, relative: str) -> Path:
        return self.root / relative

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    @property
    def components_dir(self) -> Path:
        return self.root / "components"

    def card_path(self, name: str) -> Path:
        return self.components_dir / f"{name}.yml"

    def distributions(self) -> list[str]:
        dists = self.root / "assistant_dists"
        return sorted(path.parent.name for path in dists.glob(f"*/{OVERRIDE}"))

    def dist_file(self, dist: str, file_name: str) -> str:
        return f"assistant_dists/{dist}/{file_name}"

    def load_cards(self) -> tuple[dict[str, Card], list[str]]:
        """Every valid card by name, and one problem line per card that is not valid."""
        cards: dict[str, Card] = {}
        problems: list[str] = []
        for path in sorted(self.components_dir.glob("*.yml")):
            try:
                card = load_card(path, self.rel(path))
            except CardError as error:
                problems.extend(error.problems)
                continue
            cards[card.name] = card
        return cards, problems

    def load_valid_cards(self) -> dict[str, Card]:
        """The cards, or CardError listing every invalid one (commands that write need them all valid)."""
        cards, problems = self.load_cards()
        if problems:
            raise CardError(problems)
        return cards
