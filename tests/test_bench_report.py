"""The bench report (bench/report.py): a run's JSON as Markdown, the machine line, and the README's performance block.

Tier: plain unit tests on hand-built run dicts, no model and no server; one test reads the real
machine this suite runs on. `make bench` (bench/run.py) writes the same Markdown beside each run.
"""

import json

import pytest
from click.testing import CliRunner

from bench.report import describe_machine, latest_run, machine, main, markdown, paste_into_readme

MACHINE = {
    "cpu_model": "AMD EPYC 9B14",
    "cpus": 2,
    "torch_threads": 2,
    "memory_gib": 23.4,
    "cpu_flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"],
    "python": "3.11.9",
    "torch": "2.13.0",
    "node": "bench-host",
}
RUN = {
    "model": "smollm2-135m-instruct",
    "new_tokens_per_request": 32,
    "machine": MACHINE,
    "finished_at": "2026-12-06T05:41:05Z",
    "rows": [
        {
            "system": "raw generate",
            "mode": "sequential",
            "clients": 1,
            "tokens_per_second": 41.234,
            "p50_seconds": 0.776,
            "p95_seconds": None,
            "vs_raw_sequential": 1.0,
            "vs_raw_static_batch_16": 0.25,
            "vs_peer_same_clients": None,
        },
        # a row from a step that records no ratios at all
        {"system": "parley /respond | llama.cpp", "mode": "closed loop", "clients": 16, "tokens_per_second": 312.0, "p50_seconds": 1.5, "p95_seconds": 1.9},
    ],
    "targets": [
        {"target": "parley /respond 16 clients tok/s vs peer", "measured": 1.234, "goal": ">= 1.10", "met": True},
        {"target": "parley /respond 1 client tok/s vs raw sequential", "measured": 0.9, "goal": ">= 0.95", "met": False},
        {"target": "parley service ready after start (s)", "measured": None, "goal": "<= 5", "met": False},
        {"target": "parley /respond fp32 16 clients tok/s vs peer", "measured": 2.2, "goal": ">= 2.50", "met": None},
    ],
    "facts": {
        "failed_steps": [{"step": "transformers_serve", "error": "TimeoutError: not ready in 60 s"}],
        "skipped": ["llama_server_peer: llama-server not found"],
    },
}
README = """# Parley

Intro.

## Performance

Some words.

<!-- bench-report: bench-20260101T000000Z.json -->
an old table
<!-- /bench-report -->

## Security

The rest.
"""


def _table_line(block: str, first_cell: str) -> str:
    return next(line for line in block.splitlines() if line.startswith(f"| {first_cell} |"))


def test_markdown_names_the_run_and_its_machine():
    block = markdown(RUN)

    assert block.splitlines()[0] == (
        "Run finished 2026-12-06T05:41:05Z: smollm2-135m-instruct, 32 new tokens per request, on "
        "AMD EPYC 9B14, 2 CPUs (2 torch threads), 23.4 GiB, avx2 avx512f avx512_vnni avx512_bf16; Python 3.11.9, torch 2.13.0."
    )
    assert not block.startswith("#")


def test_markdown_rows_show_rounded_numbers_ratios_and_dashes_for_what_is_missing():
    block = markdown(RUN)

    assert _table_line(block, "raw generate") == "| raw generate | sequential | 1 | 41.2 | 0.78 | - | 1.00× | 0.25× | - |"
    # a "|" in a cell is escaped; a row without ratio keys shows "-" for each
    assert _table_line(block, "parley /respond \\| llama.cpp") == (
        "| parley /respond \\| llama.cpp | closed loop | 16 | 312.0 | 1.50 | 1.90 | - | - | - |"
    )


def test_markdown_targets_mark_the_missed_ones():
    block = markdown(RUN)

    assert _table_line(block, "parley /respond 16 clients tok/s vs peer") == "| parley /respond 16 clients tok/s vs peer | 1.23 | >= 1.10 | met |"
    assert _table_line(block, "parley /respond 1 client tok/s vs raw sequential") == (
        "| parley /respond 1 client tok/s vs raw sequential | 0.90 | >= 0.95 | **missed** |"
    )
    assert _table_line(block, "parley service ready after start (s)") == "| parley service ready after start (s) | - | <= 5 | **missed** |"
    # A row held to no goal (met: None) is there for comparison only.
    assert _table_line(block, "parley /respond fp32 16 clients tok/s vs peer") == (
        "| parley /respond fp32 16 clients tok/s vs peer | 2.20 | >= 2.50 | reference |"
    )


def test_markdown_lists_failed_and_skipped_steps():
    block = markdown(RUN)

    assert "- failed: transformers_serve: TimeoutError: not ready in 60 s" in block.splitlines()
    assert "- skipped: llama_server_peer: llama-server not found" in block.splitlines()


def test_markdown_lists_each_engine_profile_on_one_line_nested_numbers_under_their_parent():
    facts = {"llama.cpp engine profile": {"steps": 120, "decode_ms_per_step": 21.456},
             "engine profile, native decode step": {"rows": 16, "ms": {"linear": 4.1, "attention": 0.75}},
             "llama.cpp draft study": {"ngram >= 2": {"tokens_per_step": 1.0557}},
             "parley service startup": {"ready_seconds": 2.0}}

    block = markdown({**RUN, "facts": facts})

    assert "- llama.cpp engine profile: steps 120, decode_ms_per_step 21.46" in block.splitlines()
    assert "- engine profile, native decode step: rows 16, ms.linear 4.10, ms.attention 0.75" in block.splitlines()
    assert "- llama.cpp draft study: ngram >= 2.tokens_per_step 1.06" in block.splitlines()
    assert "ready_seconds" not in block


def test_markdown_without_failures_has_no_list():
    block = markdown({**RUN, "facts": {"parley service startup": {"ready_seconds": 2.0}}})

    assert not [line for line in block.splitlines() if line.startswith("- ")]


def test_describe_machine_reads_the_three_keys_older_runs_wrote():
    assert describe_machine({"node": "bench-host", "cpus": 2, "torch": "2.13.0"}) == "host bench-host, 2 CPUs; torch 2.13.0"


def test_the_real_machine_has_cpus_and_a_cpu_model():
    this_machine = machine()

    assert this_machine["cpus"] > 0
    assert this_machine["cpu_model"]
    assert describe_machine(this_machine).startswith(this_machine["cpu_model"])


def test_latest_run_is_the_newest_json_by_its_time_stamped_name(tmp_path):
    for name in ("bench-20261206T054105Z.json", "bench-20261207T010000Z.json", "bench-20261208T000000Z.md", "live-check-20261209T000000Z.md"):
        (tmp_path / name).write_text("{}")

    assert latest_run(tmp_path) == tmp_path / "bench-20261207T010000Z.json"
    assert latest_run(tmp_path / "absent") is None


def test_paste_into_readme_replaces_only_the_block_and_renames_the_marker():
    pasted = paste_into_readme(README, "bench-20261206T054105Z.json", "the new table\n")

    assert pasted == README.replace(
        "<!-- bench-report: bench-20260101T000000Z.json -->\nan old table\n",
        "<!-- bench-report: bench-20261206T054105Z.json -->\nthe new table\n",
    )


def test_paste_into_readme_keeps_escaped_pipes_as_they_are():
    pasted = paste_into_readme(README, "bench-x.json", markdown(RUN))

    assert "| parley /respond \\| llama.cpp |" in pasted


def test_paste_into_readme_without_markers_says_which_are_missing():
    with pytest.raises(ValueError, match="bench-report markers"):
        paste_into_readme("# Parley\n\n## Security\n", "bench-x.json", "a table\n")


def test_the_project_readme_has_the_markers():
    from bench.common import REPO_ROOT

    paste_into_readme((REPO_ROOT / "README.md").read_text(), "bench-x.json", "a table\n")


def test_cli_prints_the_markdown_of_a_run_file(tmp_path):
    run_path = tmp_path / "bench-20261206T054105Z.json"
    run_path.write_text(json.dumps(RUN))

    result = CliRunner().invoke(main, [str(run_path)], catch_exceptions=False)

    assert result.exit_code == 0
    assert result.output == markdown(RUN)


def test_cli_readme_pastes_the_run_into_the_readme(tmp_path):
    run_path = tmp_path / "bench-20261206T054105Z.json"
    run_path.write_text(json.dumps(RUN))
    readme_path = tmp_path / "README.md"
    readme_path.write_text(README)

    result = CliRunner().invoke(main, [str(run_path), "--readme", "--readme-path", str(readme_path)], catch_exceptions=False)

    assert result.exit_code == 0
    assert "now shows bench-20261206T054105Z.json" in result.output
    assert readme_path.read_text() == paste_into_readme(README, run_path.name, markdown(RUN))
    assert "| raw generate | sequential | 1 | 41.2 |" in readme_path.read_text()


def test_cli_readme_without_markers_fails_with_the_reason(tmp_path):
    run_path = tmp_path / "bench-20261206T054105Z.json"
    run_path.write_text(json.dumps(RUN))
    readme_path = tmp_path / "README.md"
    readme_path.write_text("# Parley\n")

    result = CliRunner().invoke(main, [str(run_path), "--readme", "--readme-path", str(readme_path)])

    assert result.exit_code == 1
    assert "bench-report markers" in result.output
    assert readme_path.read_text() == "# Parley\n"
