"""The continuous-batching engine in-process, without HTTP: its throughput, and where a step's time goes.

Separates the engine's own cost from the service's (HTTP, tokenising, detokenising), and profiles
one full batch: how much of a step goes to the linear layers, the lm head, attention, sampling and scheduling.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import QUESTIONS, BenchContext, Measurement, chat_messages
from services.transformers_lm.engine import GenerationRequest, SamplingParams
from services.transformers_lm.engines.continuous_batching import ContinuousBatchingEngine

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
    engine.stats = type(engine.stats)()
    timers = ModuleTimers(engine.model)
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
    parts["other model ops (embeddings, norms, activations, python)"] = stats.forward_seconds - sum(parts.values())
    parts["sampling"] = stats.sampling_seconds
    parts["scheduling (admit, release, streams)"] = stats.step_seconds - stats.forward_seconds - stats.sampling_seconds
    return {
        "rows": len(prompts),
        "engine_stats": stats.as_dict(),
        "ms_per_step": {k: 1000 * v / steps for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
    }


def continuous_batching_engine(ctx: BenchContext) -> None:
    ctx.progress("continuous-batching engine in-process: loading the model")
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.float32)
    prompts = [
        tuple(tokenizer(tokenizer.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True))["input_ids"])
        for q in QUESTIONS
    ]
    clients = max(ctx.client_counts)
    engine = ContinuousBatchingEngine(model, max_batch_size=clients)
    try:
        ctx.progress(f"continuous-batching engine in-process: {clients} requests at once, {ctx.rounds} rounds")
        latencies, tokens = [], 0
        started = time.perf_counter()
        for _ in range(ctx.rounds):
            round_started = time.perf_counter()
            streams = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=ctx.new_tokens))) for p in prompts[:clients]]
            tokens += sum(len(stream.collect()) for stream in streams)
            latencies += [time.perf_counter() - round_started] * len(streams)
        ctx.record(
            Measurement(
                clients=clients, requests=len(latencies), seconds=time.perf_counter() - started, new_tokens=tokens,
                latencies=latencies, system="engine in-process", mode=f"batch of {clients}",
            )
        )
        ctx.progress("continuous-batching engine in-process: profiling one full batch")
        started = time.perf_counter()
        profile = _profile(engine, prompts[:clients], ctx)
        profile["profiled_seconds"] = time.perf_counter() - started
        ctx.facts["engine profile"] = profile
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in profile["ms_per_step"].items())
        ctx.progress(f"  per step ({clients} rows), ms: {kinds}")
    finally:
        engine.close()


STEPS = [continuous_batching_engine]
