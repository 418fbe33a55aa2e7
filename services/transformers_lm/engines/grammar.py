"""Constrained decoding: a grammar per row of a batch, as a token mask applied to that row's logits.

A request may carry a `Grammar` (JSON schema, any JSON object, a tool call: the service builds
them, `services/transformers_lm/structured_output.py`). The engine gives each such row its own
matcher; before every step's sampling it computes the masks of all constrained rows of the step
at once (`StepMasks`, in parallel on llguidance's thread pool, without the GIL), sets every
forbidden token's logit to -inf (so greedy argmax, penalties and the sampling chains all see only
allowed tokens), and after sampling advances the row's matcher with the chosen token. A grammar
that can take no further token ends its row (finish reason STOP). Rows without a grammar pay
nothing: no matcher, no mask, not even a branch per token beyond `row.matcher is None`.

Why llguidance (PyPI `llguidance`), not xgrammar: both were tried on the embedded SmolLM2's
49,152-token vocabulary on this 2-core CPU, one matcher, the tokens of a known-good answer fed one
by one (measured with /tmp scripts, numbers from one sitting each):

| | llguidance 1.9.1 | xgrammar 0.2.9 |
| --- | --- | --- |
| tokenizer set-up (once per model) | 0.6–0.8 s | 0.9 s |
| compile a 4-property JSON schema | 2.5–3.5 ms | 13–16 ms (20–35 ms for `json_object`) |
| mask per token, that schema | mean 60 µs, p50 50 µs | mean 11–17 µs, p50 5 µs |
| mask per token, any JSON object | mean 180–340 µs, p50 25 µs (a few ms on the first tokens) | mean 14–19 µs |
| what it installs | nothing else (3 MB wheel) | torch, transformers, triton, apache-tvm-ffi |
| an unsupported schema | names it: `Unimplemented keys: ["if", "then"]` | |

xgrammar's masks are faster per token, but a 16-row decode step takes ≈60 ms here (llama.cpp) and
llguidance's masks for 16 rows take 1–3 ms of it, in parallel threads; a new schema compiles on
the request thread in 2–3 ms instead of 15–35 ms; its errors name the keyword a 400 must name; its
Lark grammars embed JSON schemas (`%json {...}`), which is how a tool call is written down; and it
adds no dependency (xgrammar would pull triton, hundreds of MB, into every image). `make bench`
(`bench/structured_steps.py`) measures the cost per constrained token against unconstrained ones.

llama.cpp's own GBNF grammar sampler is not used: it walks the candidate tokens through the
grammar's stacks on each step, one sequence at a time, and it does not compile JSON schemas itself
(llama-cpp-python converts them to GBNF in Python first). Measured once through llama-cpp-python
(F16 SmolLM2, 1 thread, greedy, 32 tokens, the 400-character-story schema of
`bench/structured_steps.py`, on a machine loaded by other work, so only the ratio counts): 412–424
ms per token with the grammar against 308 ms without, about +35 % for that one row; llguidance's
masks for 16 rows of that schema took 0.2–3 ms per step to compute and about 1 ms to apply (one
outlier of 15 ms under load), a few per cent of a 16-row step.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # llguidance is imported on first use: serving without constraints never loads it
    import llguidance
    import torch

# A grammar that explodes (deep nesting, huge alternations) fails when it is compiled, not mid-answer.
_COMPILED_GRAMMARS_KEPT = 64


class GrammarError(ValueError):
    """The grammar cannot be compiled; the message is llguidance's, naming what it cannot do."""


def llguidance_module():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("constrained decoding needs the llguidance package (pip install llguidance)") from None
    return llguidance


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it (built once per model: about a second)."""

    def __init__(self, tokenizer: "llguidance.LLTokenizer", vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the width of the model's logits (may exceed the tokenizer's)
        self._compile = lru_cache(maxsize=_COMPILED_GRAMMARS_KEPT)(self._compile_uncached)
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> "GrammarTokenizer":
        """From a Hugging Face `tokenizer.json` (the transformers backend's tokenizers)."""
        llguidance = llguidance_module()
        tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        return cls(tokenizer, vocab_size)

    def compile(self, grammar: str) -> "Grammar":
        """A checked grammar (llguidance's grammar JSON, e.g. from `LLMatcher.grammar_from_lark`);
        GrammarError when llguidance cannot compile it. Recent grammars are kept compiled."""
        with self._lock:
            return self._compile(grammar)

    def _compile_uncached(self, grammar: str) -> "Grammar":
        llguidance = llguidance_module()
        try:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as error:  # a grammar it cannot even read
            raise GrammarError(_first_line(str(error))) from None
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return Grammar(self, matcher)


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "the grammar cannot be compiled"


class Grammar:
    """A compiled grammar; every row that uses it gets a fresh copy of its matcher (`matcher()`)."""

    def __init__(self, tokenizer: GrammarTokenizer, prototype: "llguidance.LLMatcher"):
        self.tokenizer = tokenizer
        self._prototype = prototype
        self._lock = threading.Lock()

    def matcher(self) -> "llguidance.LLMatcher":
        with self._lock:
            return self._prototype.deep_copy()


class StepMasks:
    """The token masks of one step's constrained rows, computed together and applied row by row."""

    def __init__(self, vocab_size: int, max_rows: int):
        llguidance = llguidance_module()
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.bitmask = np.zeros((max_rows, self.words), dtype=np.int32)
        self._executor = llguidance.LLExecutor()

    def fill(self, matchers: list["llguidance.LLMatcher"]) -> None:
        """Compute mask i for matchers[i], in parallel and without the GIL."""
        if len(matchers) > self.bitmask.shape[0]:
            self.bitmask = np.zeros((len(matchers), self.words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(matcher, index) for index, matcher in enumerate(matchers)],
            self.bitmask.ctypes.data,
            self.words * 4,
            self.bitmask.shape[0],
        )

    def allowed(self, index: int) -> np.ndarray:
        """Mask i as one bool per token id."""
        bits = np.unpackbits(self.bitmask[index].view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def apply_numpy(self, index: int, logits: np.ndarray) -> None:
        """Forbid (-inf) every token mask i does not allow, in place on one row of logits."""
        allowed = self.allowed(index)
        width = min(len(logits), len(allowed))
        logits[:width][~allowed[:width]] = -np.inf
        logits[width:] = -np.inf

    def apply_torch(self, index: int, logits: "torch.Tensor") -> None:
        """The same on one row of a torch tensor (any device)."""
        import torch

        allowed = torch.from_numpy(self.allowed(index)).to(logits.device)
        width = min(logits.shape[-1], allowed.shape[0])
        logits[:width].masked_fill_(~allowed[:width], float("-inf"))
        logits[width:] = float("-inf")


def advance(matcher: "llguidance.LLMatcher", token_id: int) -> bool:
    """Feed the chosen token to the row's matcher; False when the grammar refuses it."""
    return bool(matcher.consume_token(token_id))


def is_complete(matcher: "llguidance.LLMatcher") -> bool:
    """Whether the grammar can take no further token (only an end-of-sequence): the row is done."""
    return bool(matcher.is_stopped())
