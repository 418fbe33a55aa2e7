"""A copy of the repository's bundle for tests that run `parley` on it, and a runner for its commands."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from parley.cli import cli
from support.servers import REPO_ROOT

# What `parley` reads and writes: the cards, the distributions, the generated files, the model registry.
BUNDLE = [
    ".env", "docker-compose.yml", "components.tsv", "MODELS.md", "components", "assistant_dists", "common", "services",
    "skills", "models",
]


def copy_bundle(root: Path) -> Path:
    """The repository's bundle copied to `root` (created), without caches."""
    root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".cache")
    for name in BUNDLE:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    return root


def run_parley(root: Path, *args: str, code: int = 0) -> str:
    """`parley ARGS --repo ROOT` in-process; its output (stdout and stderr), once its exit code is `code`."""
    result = CliRunner().invoke(cli, [*args, "--repo", str(root)], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def write_tiny_gguf(path: Path, *, context_length: int = 2048, eos: bool = True) -> Path:
    """A small GGUF file (no chat template) declaring a window, its dimensions and, with `eos`, an EOS token."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
    writer.add_bos_token_id(1)
    if eos:
        writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
