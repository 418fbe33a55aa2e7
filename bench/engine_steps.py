"""The continuous-batching engine in-process, without HTTP: its throughput, and where a step's time goes.

Separates the engine's own cost from the service's (HTTP, tokenising, detokenising). Runs the
engine on both model codes of the transformers backend — Parley's native Llama (what the service
runs for the embedded model) and transformers' modelling code — with the prefix cache off, so the
two compare the model code alone, then profiles one full batch of each: for transformers, module
hooks (linear layers, lm head, attention); for native, torch.profiler over one 16-row decode step,
by operator and by weight (q/k/v, o, gate/up, down, lm head).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import QUESTIONS, BenchContext, Measurement, chat_messages, chat_prompt_ids
from services.transformers_lm.engines import GenerationRequest, SamplingParams
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine
from services.transformers_lm.engines.native_llama import NativeLlama
from services.transformers_lm.engines.slot_cache import SlotBatch

class ModuleTimers:
    """Wall time spent in the model's parts, from forward hooks, in whichever thread runs the model.

    (torch.profiler only records the thread that started it; the engine runs the model in its own.)
    """

    def __init__(self, model: torch.nn.Module):
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}
        self._handles = []
        lm_head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if module is lm_head:
                self._time(module, "lm head (vocabulary projection)")
            elif isinstance(module, torch.nn.Linear):
                self._time(module, "attention projections (q, k, v, o)" if ".self_attn." in name else "MLP")
            elif name.endswith("self_attn"):
                self._time(module, "self_attn total")

    def _time(self, module: torch.nn.Module, kind: str) -> None:
        def before(mod, args):
            self._started[id(mod)] = time.perf_counter()

        def after(mod, args, output):
            self.seconds[kind] += time.perf_counter() - self._started.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _profile(engine: ContinuousBatchingEngine, prompts, ctx: BenchContext) -> dict:
    """Where one full batch's step time goes, in ms per step, with the engine's own counters."""
    engine.reset_stats()
    timers = ModuleTimers(engine.model.model)
    try:
        streams = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=ctx.new_tokens))) for p in prompts]
        for stream in streams:
            stream.collect()
    finally:
        timers.remove()
    stats = engine.stats
    steps = max(stats.steps, 1)
    seconds = dict(timers.seconds)
    projections = seconds.get("attention projections (q, k, v, o)", 0.0)
    attention_core = seconds.pop("self_attn total", 0.0) - projections
    parts = {
        **seconds,
        "attention core (rotary, slot attention, kv writes)": attention_core,
    }
    parts["other model ops (embeddings, norms, activations, python)"] = stats.model_seconds - sum(parts.values())
    parts["sampling"] = stats.sampling_seconds
    parts["scheduling (admit, release, streams)"] = stats.step_seconds - stats.model_seconds - stats.sampling_seconds
    return {
        "rows": len(prompts),
        "engine_stats": stats.as_dict(),
        "ms_per_step": {k: 1000 * v / steps for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
    }


def _native_decode_step_profile(model: NativeLlama, rows: int, context: int) -> dict:
    """ms per operator (matrix products by weight) of one decode step of `rows` rows at `context` positions."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(num_slots=rows, max_positions=context + 1)
    cache.ensure_capacity(context + 1)
    positions = torch.full((rows,), context, dtype=torch.long)
    mask = (torch.arange(context + 1)[None, :] <= positions[:, None])[:, None, None, :]
    batch = SlotBatch(cache, rows, positions, mask, [])
    tokens, logit_indices = torch.randint(0, model.vocab_size, (rows,)), torch.arange(rows)
    weight_names = {}
    for layer in model.layers:
        for name in ("qkv", "output", "gate_up", "down"):
            weight_names[tuple(getattr(layer, name).shape)] = {"qkv": "q/k/v", "output": "o", "gate_up": "gate/up"}.get(name, name)
    weight_names[tuple(model.lm_head.shape)] = "lm head"
    with torch.inference_mode():
        for _ in range(3):
            model.forward(tokens, positions, batch, logit_indices)
        repeats = 5
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            for _ in range(repeats):
                model.forward(tokens, positions, batch, logit_indices)
    parts: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key == "aten::linear":
            shapes = event.input_shapes
            weight = tuple(shapes[1]) if len(shapes) > 1 and shapes[1] else ()
            parts[f"matmul {weight_names.get(weight, weight)}"] += event.cpu_time_total
        elif event.key == "aten::scaled_dot_product_attention":
            parts["attention (sdpa)"] += event.cpu_time_total
    total = sum(e.self_cpu_time_total for e in profiler.key_averages())
    parts["everything else (norms, rotary, kv writes, python)"] = total - sum(parts.values())
    return {k: v / 1000 / repeats for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def _run_batches(ctx: BenchContext, engine: ContinuousBatchingEngine, prompts, system: str) -> None:
    clients = len(prompts)
    ctx.progress(f"{system}: {clients} requests at once, {ctx.rounds} rounds")
    latencies, tokens = [], 0
    started = time.perf_counter()
    for _ in range(ctx.rounds):
        round_started = time.perf_counter()
        streams = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=ctx.new_tokens))) for p in prompts]
        tokens += sum(len(stream.collect()) for stream in streams)
        latencies += [time.perf_counter() - round_started] * len(streams)
    ctx.record(
        Measurement(
            clients=clients, requests=len(latencies), seconds=time.perf_counter() - started, new_tokens=tokens,
            latencies=latencies, system=system, mode=f"batch of {clients}",
        )
    )


def continuous_batching_engine(ctx: BenchContext) -> None:
    ctx.progress("continuous-batching engine in-process: loading the model (native and transformers code)")
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.model_dir))
    clients = max(ctx.client_counts)
    prompts = [
        tuple(tokenizer(tokenizer.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True))["input_ids"])
        for q in QUESTIONS
    ][:clients]
    native = NativeLlama.load(ctx.model_dir, torch.float32, torch.device("cpu"))
    engine = ContinuousBatchingEngine(native, max_batch_size=clients, prefix_cache_bytes=0)
    try:
        _run_batches(ctx, engine, prompts, "engine in-process, native")
    finally:
        engine.close()
    engine = ContinuousBatchingEngine(native, max_batch_size=clients)
    try:
        _run_batches(ctx, engine, prompts, "engine in-process, native + prefix cache")
        ctx.facts["engine prefix cache"] = engine.stats.as_dict()
    finally:
        engine.close()
    ctx.progress("continuous-batching engine in-process: profiling a native decode step")
    context = max(len(p) for p in prompts) + ctx.new_tokens // 2
    ctx.facts["engine profile, native decode step"] = {
        "rows": clients, "context": context, "ms": _native_decode_step_profile(native, clients, context)
    }
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in ctx.facts["engine profile, native decode step"]["ms"].items())
    ctx.progress(f"  native decode step ({clients} rows), ms: {kinds}")

    model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.float32)
    engine = ContinuousBatchingEngine(model, max_batch_size=clients, prefix_cache_bytes=0)
    try:
        _run_batches(ctx, engine, prompts, "engine in-process, transformers code")
        ctx.progress("continuous-batching engine in-process: profiling one full batch (transformers code)")
        started = time.perf_counter()
        profile = _profile(engine, prompts, ctx)
        profile["profiled_seconds"] = time.perf_counter() - started
        ctx.facts["engine profile, transformers code"] = profile
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in profile["ms_per_step"].items())
        ctx.progress(f"  per step ({clients} rows), ms: {kinds}")
    finally:
        engine.close()


# Short questions of the test suite, beside the bench's long ones.
TEST_QUESTIONS = ("What is the capital of France?", "Name a primary colour.", "What do bees make?", "How many legs does a spider have?")


def transformers_bf16_answers(ctx: BenchContext) -> None:
    """Greedy answers of the service's transformers backend in bfloat16 against float32, on the bench's
    and the tests' questions: how many are equal, where the others part, and whether each precision
    answers the same batched as one at a time (what the engine's tests hold float32 to)."""
    from services.transformers_lm.backends import LoadOptions
    from services.transformers_lm.backends.transformers_backend import load_transformers_model

    questions = [*QUESTIONS, *TEST_QUESTIONS]
    answers: dict[str, list[list[int]]] = {}
    study: dict = {"questions": len(questions), "new_tokens": ctx.new_tokens}
    for dtype, half in (("float32", False), ("bfloat16", True)):
        ctx.progress(f"transformers {dtype}: {len(questions)} greedy answers, one at a time and batched")
        loaded = load_transformers_model(ctx.model_dir, LoadOptions(device="cpu", half_precision=half, max_batch_size=len(questions)))
        try:
            sampling = SamplingParams(max_new_tokens=ctx.new_tokens, stop_token_ids=loaded.info.eos_token_ids)
            requests = [GenerationRequest(prompt, sampling) for prompt in chat_prompt_ids(loaded, questions)]
            alone = [loaded.engine.submit(request).collect() for request in requests]
            batched = [stream.collect() for stream in [loaded.engine.submit(request) for request in requests]]
            study[f"{dtype} batched equals one at a time"] = sum(a == b for a, b in zip(alone, batched))
            study[f"{dtype} capital of France"] = loaded.decode(alone[len(QUESTIONS)])
            answers[dtype] = alone
        finally:
            loaded.close()
    parted = [
        next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
        for first, second in zip(answers["float32"], answers["bfloat16"])
        if first != second
    ]
    study["bfloat16 equals float32"] = len(questions) - len(parted)
    study["tokens before the others part"] = sorted(parted)
    ctx.facts["transformers bf16 answers study"] = study
    ctx.progress(f"  {study}")


STEPS = [continuous_batching_engine, transformers_bf16_answers]
