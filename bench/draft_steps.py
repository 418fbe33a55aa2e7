"""`make bench` step for one lever of the llama.cpp engine: speculative decoding with prompt-lookup drafts.

A prompt-lookup draft takes the last few tokens of a sequence (its prompt and what it generated so
far), finds them earlier in the sequence, and proposes the tokens that followed there; one decode
then verifies the drafts with the next token, and every draft the model would have picked greedily
is a token gained. Whether it pays depends on two numbers, both measured here on the default
weights and the bench's own questions:

- how many tokens a step would yield: the greedy answers are generated, then the drafts replayed
  over them (`tokens_per_step`: 1.0 means no draft was ever right);
- what the extra rows cost: one `llama_decode` of S sequences with 1 row each, against the same
  with 1 + d rows each (d drafts), at S = 1 and at the largest client count.

The `llama.cpp draft study` fact holds both and the gain they predict (tokens per step over the
step's cost, against plain decoding); below 1.0 the lever loses, and the engine does not draft.
"""

from __future__ import annotations

import statistics
import time

from bench.common import MODEL_NAME, QUESTIONS, REPO_ROOT, BenchContext, chat_prompt_ids
from bench.llama_cpp_steps import _available, _threads

DRAFT_TOKENS = 3  # drafts per sequence per step
LONGEST_NGRAM = 3  # the longest tail looked up; shorter ones are tried when it is not found
PROMPT_TOKENS_CAP = 256  # KV positions per sequence in the cost context


def prompt_lookup_draft(context: list[int], draft_tokens: int, shortest: int, longest: int = LONGEST_NGRAM) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the context's last n tokens (n from
    `longest` down to `shortest`), at most `draft_tokens` of them; [] when no tail recurs."""
    for size in range(longest, shortest - 1, -1):
        if len(context) <= size:
            continue
        tail = context[-size:]
        for start in range(len(context) - size - 1, -1, -1):
            if context[start : start + size] == tail:
                return context[start + size : start + size + draft_tokens]
    return []


def replay_drafts(prompt: tuple[int, ...] | list[int], answer: list[int], draft_tokens: int, shortest: int) -> tuple[int, list[int]]:
    """Replay prompt-lookup drafting over a greedy answer: (steps it would take, drafts per step).

    Each step feeds the last token with its drafts; the model's greedy pick after each fed token
    accepts a draft while they agree, so a step yields the accepted drafts plus one token.
    """
    position, steps, drafts_per_step = 0, 0, []
    while position < len(answer):
        draft = prompt_lookup_draft([*prompt, *answer[:position]], draft_tokens, shortest)
        accepted = 0
        while accepted < len(draft) and position + accepted < len(answer) and draft[accepted] == answer[position + accepted]:
            accepted += 1
        steps += 1
        drafts_per_step.append(len(draft))
        position += accepted + 1
    return steps, drafts_per_step


def llama_cpp_draft_study(ctx: BenchContext) -> None:
    if not _available(ctx, "llama.cpp draft study"):
        return
    from common.model_sources import gguf_weights_to_run, resolve_model_source
    from services.transformers_lm.backends import LoadOptions
    from services.transformers_lm.backends.llama_cpp_backend import LlamaCppBackend
    from services.transformers_lm.engines import GenerationRequest, SamplingParams

    clients = max(ctx.client_counts)
    weights = gguf_weights_to_run(MODEL_NAME, "auto")
    options = LoadOptions(threads=_threads(), max_batch_size=clients, gguf_weights="auto", cache_dir=REPO_ROOT / ".cache" / "models")
    loaded = LlamaCppBackend().load(resolve_model_source(MODEL_NAME), options)
    try:
        prompts = chat_prompt_ids(loaded, QUESTIONS)
        sampling = SamplingParams(max_new_tokens=ctx.new_tokens, min_new_tokens=ctx.new_tokens, stop_token_ids=loaded.info.eos_token_ids)
        ctx.progress(f"llama.cpp draft study: greedy answers to {len(prompts)} questions ({weights.upper()} weights)")
        streams = [loaded.engine.submit(GenerationRequest(prompt, sampling)) for prompt in prompts]
        answers = [stream.collect() for stream in streams]
        loaded.engine.close()  # the cost context below gets the cores to itself
        ctx.progress("llama.cpp draft study: timing decode steps with and without draft rows")
        costs = _decode_costs(loaded.model, prompts, answers, clients, _threads())
    finally:
        loaded.close()
    study = {"weights": weights, "draft_tokens": DRAFT_TOKENS, "step_ms": costs}
    for shortest in (1, 2):
        replays = [replay_drafts(prompt, answer, DRAFT_TOKENS, shortest) for prompt, answer in zip(prompts, answers)]
        steps = sum(count for count, _ in replays)
        drafts = [count for _, per_step in replays for count in per_step]
        tokens_per_step = sum(len(answer) for answer in answers) / steps
        # A step's cost at one sequence, by how many draft rows it carried (measured for 0..DRAFT_TOKENS).
        one = statistics.fmean(costs[f"1 x {1 + count} rows"] for count in drafts) / costs["1 x 1 rows"]
        # At many sequences the rows cost about the same each: the mean drafts add their share.
        per_row = (costs[f"{clients} x {1 + DRAFT_TOKENS} rows"] - costs[f"{clients} x 1 rows"]) / (clients * DRAFT_TOKENS)
        many = 1 + statistics.fmean(drafts) * clients * per_row / costs[f"{clients} x 1 rows"]
        study[f"ngram >= {shortest}"] = {
            "tokens_per_step": tokens_per_step,
            "draft_rows_per_step": statistics.fmean(drafts),
            "predicted_gain_1_client": tokens_per_step / one,
            f"predicted_gain_{clients}_clients": tokens_per_step / many,
        }
    ctx.facts["llama.cpp draft study"] = study
    ctx.progress(f"  {study}")


def _decode_costs(model, prompts: list[tuple[int, ...]], answers: list[list[int]], clients: int, threads: int) -> dict[str, float]:
    """Median ms of one llama_decode: 1 sequence with 1..1+DRAFT_TOKENS rows, `clients` sequences with 1 and 1+DRAFT_TOKENS rows each.

    Every sequence first holds its real prompt; the rows are its answer's first tokens, removed again after each decode.
    """
    llama = model.llama_cpp
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_seq_max = clients * PROMPT_TOKENS_CAP, clients
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    context = llama.llama_init_from_model(model.pointer, params)
    batch = llama.llama_batch_init(512, 0, 1)
    memory = llama.llama_get_memory(context)
    sequences = list(range(clients))
    prompt_of = {seq: prompts[seq % len(prompts)][: PROMPT_TOKENS_CAP // 2] for seq in sequences}
    answer_of = {seq: answers[seq % len(answers)] for seq in sequences}

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for index, (token, position, seq, logits) in enumerate(entries):
            batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, position, 1
            batch.seq_id[index][0], batch.logits[index] = seq, int(logits)
        batch.n_tokens = len(entries)
        if llama.llama_decode(context, batch) != 0:
            raise RuntimeError("llama_decode failed in the draft study")

    def timed(count: int, rows: int) -> float:
        times = []
        for _ in range(5):
            entries = [
                (answer_of[seq][row], len(prompt_of[seq]) + row, seq, True) for seq in sequences[:count] for row in range(rows)
            ]
            started = time.perf_counter()
            decode(entries)
            times.append(time.perf_counter() - started)
            for seq in sequences[:count]:
                llama.llama_memory_seq_rm(memory, seq, len(prompt_of[seq]), -1)
        return 1000 * statistics.median(times)

    try:
        for seq in sequences:
            decode([(token, position, seq, False) for position, token in enumerate(prompt_of[seq])])
        costs = {f"1 x {rows} rows": timed(1, rows) for rows in range(1, DRAFT_TOKENS + 2)}
        costs.update({f"{clients} x {rows} rows": timed(clients, rows) for rows in (1, 1 + DRAFT_TOKENS)})
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(context)
    return costs


STEPS = [llama_cpp_draft_study]
