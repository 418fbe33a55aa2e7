"""The peer: `transformers serve --continuous-batching` (transformers' own OpenAI server), same model, same prompts."""

from __future__ import annotations

from bench.common import REPO_ROOT, VENV_BIN, BenchContext, free_port, server_process
from bench.service_steps import chat_payload, measure_closed_loops, measure_startup


def transformers_serve(ctx: BenchContext) -> None:
    executable = VENV_BIN / "transformers"
    port = free_port()
    model = str(ctx.model_dir)
    command = [
        str(executable), "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), model,
    ]
    ctx.progress(f"transformers serve --continuous-batching: starting on port {port}")
    with server_process(command, port=port, cwd=REPO_ROOT, env={}, log_path=REPO_ROOT / "bench/results/transformers-serve.log") as server:
        chat_url = server.base_url + "/v1/chat/completions"
        chat = chat_payload(model, ctx.new_tokens)
        measure_startup(ctx, "transformers serve", server, chat_url, chat)
        measure_closed_loops(ctx, "transformers serve --cb", chat_url, chat)


STEPS = [transformers_serve]
