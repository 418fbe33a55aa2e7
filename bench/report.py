"""A bench run as Markdown: the table and targets of one `bench/results/bench-*.json`, and the machine it ran on.

`bench/run.py` writes this Markdown beside each run's JSON; this command prints it again, or pastes
it into the README's performance section between its markers, so the README shows a real run and
names the machine that produced it:

    python -m bench.report                                  # the latest run, as Markdown
    python -m bench.report bench/results/bench-20261206T054105Z.json
    python -m bench.report --readme                         # the latest run into README.md
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import click

from bench.common import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "bench" / "results"
README_PATH = REPO_ROOT / "README.md"
# The instruction sets the kernels pick from (torch's CPU kernels, llama.cpp's build), in that order.
KERNEL_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
RATIO_COLUMNS = (
    ("vs_raw_sequential", "/ raw sequential"),
    ("vs_raw_static_batch_16", "/ raw static batch 16"),
    ("vs_peer_same_clients", "/ peer, same clients"),
)
REPORT_MARKER = re.compile(r"<!-- bench-report: [^\n]*? -->\n.*?<!-- /bench-report -->", re.DOTALL)
REPORT_END = "<!-- /bench-report -->"


def _proc_fields(path: str, name: str) -> list[str]:
    """The values of every `name : value` line of a /proc file; none where the file is not there (not Linux)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [value.strip() for key, _, value in (line.partition(":") for line in lines) if key.strip() == name]


def machine() -> dict:
    """The machine this process runs on, as far as it bears on the numbers: CPU, cores, threads, memory, versions."""
    cpu_models = _proc_fields("/proc/cpuinfo", "model name")
    cpu_flags = set(" ".join(_proc_fields("/proc/cpuinfo", "flags")[:1]).split())
    memory_kib = _proc_fields("/proc/meminfo", "MemTotal")
    try:
        import torch  # lazily: the report itself needs no torch, and a machine may lack it
    except ImportError:
        torch = None
    return {
        "cpu_model": cpu_models[0] if cpu_models else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch else None,
        "memory_gib": round(int(memory_kib[0].split()[0]) / 1024**2, 1) if memory_kib else None,
        "cpu_flags": [flag for flag in KERNEL_CPU_FLAGS if flag in cpu_flags],
        "python": platform.python_version(),
        "torch": torch.__version__ if torch else None,
        "node": platform.node(),
    }


def describe_machine(machine: dict) -> str:
    """One line naming the machine; keys may be missing (runs before `machine()` wrote only node, cpus and torch)."""
    hardware = [machine.get("cpu_model") or f"host {machine.get('node') or 'unknown'}"]
    if machine.get("cpus"):
        threads = f" ({machine['torch_threads']} torch threads)" if machine.get("torch_threads") else ""
        hardware.append(f"{machine['cpus']} CPUs{threads}")
    if machine.get("memory_gib"):
        hardware.append(f"{machine['memory_gib']:.1f} GiB")
    if machine.get("cpu_flags"):
        hardware.append(" ".join(machine["cpu_flags"]))
    software = [f"{name} {machine[key]}" for key, name in (("python", "Python"), ("torch", "torch")) if machine.get(key)]
    return ", ".join(hardware) + (f"; {', '.join(software)}" if software else "")


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown(run: dict) -> str:
    """The run's rows and targets as Markdown tables, under a line naming the run and its machine; no heading."""
    lines = [
        f"Run finished {run.get('finished_at', '?')}: {run.get('model', '?')}, "
        f"{run.get('new_tokens_per_request', '?')} new tokens per request, on {describe_machine(run.get('machine') or {})}.",
        "",
    ]
    lines += _table(
        ["system", "mode", "clients", "tok/s", "p50 s", "p95 s", *(title for _, title in RATIO_COLUMNS)],
        [
            [
                row.get("system", ""),
                row.get("mode", ""),
                row.get("clients", ""),
                _number(row.get("tokens_per_second"), ".1f"),
                _number(row.get("p50_seconds"), ".2f"),
                _number(row.get("p95_seconds"), ".2f"),
                *(_number(row.get(key), ".2f", "×") for key, _ in RATIO_COLUMNS),
            ]
            for row in run.get("rows", [])
        ],
    )
    lines += ["", "Targets:", ""]
    lines += _table(
        ["target", "measured", "goal", "met"],
        [
            [check.get("target", ""), _number(check.get("measured"), ".2f"), check.get("goal", ""), _verdict(check.get("met"))]
            for check in run.get("targets", [])
        ],
    )
    facts = run.get("facts") or {}
    profiles = [
        f"- {_cell(name)}: {_flat(values)}"
        for name, values in facts.items()
        if ("profile" in name or "study" in name) and isinstance(values, dict)
    ]
    if profiles:
        lines += ["", "Where the steps' time goes (the engines' profiles), and the levers studied:", "", *profiles]
    notes = [f"failed: {_note(failure)}" for failure in facts.get("failed_steps", [])]
    notes += [f"skipped: {_note(skipped)}" for skipped in facts.get("skipped", [])]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _verdict(met: bool | None) -> str:
    """A target's last column; None marks a row kept for reference, held to no goal."""
    if met is None:
        return "reference"
    return "met" if met else "**missed**"


def _flat(values: dict, prefix: str = "") -> str:
    """A profile's numbers on one line, nested ones under their parent's name: `decode_ms 12.30, ms.linear 4.10`."""
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):
            parts.append(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{prefix}{key} {value:.2f}" if isinstance(value, float) else f"{prefix}{key} {value}")
    return _cell(", ".join(part for part in parts if part))


def _note(fact) -> str:
    """A failed step ({"step", "error"}) or a skip note (a string) as one line."""
    if isinstance(fact, dict) and "step" in fact:
        return _cell(f"{fact['step']}: {fact.get('error', '')}")
    return _cell(fact)


def latest_run(results_dir: Path = RESULTS_DIR) -> Path | None:
    """The newest bench-*.json in results_dir (their names carry the UTC time, so the last by name); None if none."""
    runs = sorted(Path(results_dir).glob("bench-*.json"))
    return runs[-1] if runs else None


def paste_into_readme(readme_text: str, run_path_name: str, block: str) -> str:
    """readme_text with the block between its bench-report markers replaced, the opening marker naming run_path_name.

    Raises ValueError when the README does not hold exactly one pair of markers.
    """
    replacement = f"<!-- bench-report: {run_path_name} -->\n{block.rstrip()}\n{REPORT_END}"
    # A function, not a template: the block's escaped "\|" must not be read as a group reference.
    pasted, count = REPORT_MARKER.subn(lambda _match: replacement, readme_text)
    if count != 1:
        raise ValueError(
            f"the README holds {count} pairs of bench-report markers, not one: put one "
            f"'<!-- bench-report: none -->' line and one '{REPORT_END}' line where the report goes "
            "(the Performance section)"
        )
    return pasted


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


@click.command(name="report")
@click.argument("run_json", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--readme", is_flag=True, help="Paste the report into the README between its bench-report markers instead of printing it.")
@click.option(
    "--readme-path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=README_PATH,
    help="The README that --readme rewrites (default: the repository's README.md).",
)
def main(run_json: Path | None, readme: bool, readme_path: Path) -> None:
    """Print a bench run (default: the latest in bench/results/) as Markdown, or paste it into the README.

    Example: python -m bench.report --readme
    """
    run_json = run_json or latest_run()
    if run_json is None:
        raise click.ClickException(f"no bench-*.json in {_shown(RESULTS_DIR)}: run `make bench` first, or name a run's JSON file")
    block = markdown(json.loads(run_json.read_text()))
    if not readme:
        click.echo(block, nl=False)
        return
    try:
        readme_path.write_text(paste_into_readme(readme_path.read_text(), run_json.name, block))
    except ValueError as error:
        raise click.ClickException(f"{_shown(readme_path)}: {error}") from error
    click.echo(f"{_shown(readme_path)}: the performance section now shows {run_json.name}")


if __name__ == "__main__":
    main()
