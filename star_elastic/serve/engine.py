"""Generation at any budget of one loaded elastic checkpoint, and elastic budget control.

`ElasticEngine` holds the parent once and a budget view per budget (views.py), built on first use
and kept: switching budgets copies no weights but the parts below. Caches are sized for each view's own config
(`generate` makes them from the view). A budget that keeps heads per group holds compact copies of those
layers' parts (`compact_views`, on by default: views.py's module doc), so its views run the sliced model's
plain matrix products: 0.99-1.01x of a sliced copy's decode on an H100 at Nano width, for about 5% of the
parent's memory (docs/RESULTS.md, views against slices). `serving_order=True` instead puts the parent's heads
in serving order at load where every budget keeps every KV group (order.py): no copies, every budget's heads a
prefix, but reorders at every token (0.95-0.97x, prefill 0.88x).

Concurrency: `generate` keeps one set of decode caches (and CUDA graph) per model, so two
sequences decoding on the same view at once would overwrite each other's KV / Mamba state. This
engine therefore runs one generation at a time, under a lock: every request owns the caches while
it decodes, and outputs do not depend on what else is running. `BatchedEngine` (batching.py) has the
same methods and interleaves requests instead: continuous batching over per-sequence cache slots,
what the server uses.

Elastic budget control (docs/METHOD.md §13): `think_then_answer` writes the reasoning with a small budget
until the end-of-thinking marker (or a token limit), then a larger budget prefills prompt +
thinking and writes the answer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from ..elastic.checkpoint import ElasticCheckpoint, budget_names, budget_spec, load_elastic
from ..errors import StarElasticError
from ..generate import generate
from ..model import Model
from .order import serving_order_fits, use_serving_order
from .views import budget_view

DEFAULT_MARKER = "</think>"


@dataclass
class Generation:
    """What one call produced: new token ids (prompt excluded), why it stopped, and timings."""

    tokens: list[int]
    finish_reason: str  # "stop" (EOS, stop string or marker) or "length"
    seconds: float
    thinking: list[int] = field(default_factory=list)  # think_then_answer: the reasoning part
    think_seconds: float = 0.0


class StopWatcher:
    """on_token callback: collects row 0's tokens and asks `generate` to stop once any stop string
    appears in their text (checked on the last few tokens' text only, so each step stays cheap)."""

    def __init__(self, tokenizer, stops: list[str], on_token=None, cancel: threading.Event | None = None):
        self.tokenizer, self.stops, self.on_token = tokenizer, [s for s in stops if s], on_token
        self.cancel = cancel  # once set, stop at the next token
        self.tokens: list[int] = []
        self.hit: str | None = None
        # a stop string of n characters spans at most n tokens (special tokens aside)
        self.window = max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, token: torch.Tensor) -> bool:
        self.tokens.append(int(token[0]))
        stop = False
        if self.stops:
            tail = self.tokenizer.decode(self.tokens[-self.window:], skip_special_tokens=False)
            self.hit = next((s for s in self.stops if s in tail), None)
            stop = self.hit is not None
        if self.on_token is not None and self.on_token(int(token[0])):
            return True  # the caller gave up (a closed stream)
        return stop or (self.cancel is not None and self.cancel.is_set())


class ElasticEngine:
    """Every budget of one elastic checkpoint, from one copy of the weights."""

    def __init__(self, ckpt: ElasticCheckpoint, serving_order: bool = False, compact_views: bool = True):
        self.compact_views = compact_views  # copy the parts a grouped bmm would run (views.budget_view)
        self.fp8_info = None  # use_fp8_matmuls' summary once the budgets multiply in FP8
        self.ckpt, self.parent, self.tokenizer = ckpt, ckpt.model.eval(), ckpt.tokenizer
        self.budgets = budget_names(ckpt.manifest)
        # heads rank-major, once, before any view: every budget's heads become a plain prefix (order.py).
        # The parent is then the engine's own: its state dict and masks refuse (group-major indices).
        specs = [budget_spec(ckpt.manifest, b) for b in self.budgets]
        # a full budget's delta (delta.py) would need its rows and columns in that order too: not built
        self.serving_order = serving_order and ckpt.delta is None and serving_order_fits(self.parent.config, specs)
        if self.serving_order:
            use_serving_order(self.parent)
        if ckpt.delta is not None:  # the parent holds W, the smaller budgets' prefixes; the full budget adds B A
            # (and a rounded rest R merged: W + B A + R, one product a layer); views are other modules over the
            # same tensors: they run W alone
            ckpt.delta.apply(self.parent, merge_rest=True)
        self.views: dict[str, Model] = {}
        self.lock = threading.Lock()  # one generation at a time: see the module doc
        self.view_lock = threading.Lock()  # a view is built once, even when requests ask for it at once

    @classmethod
    def load(cls, path, device=None, dtype=None, compact_views: bool = True,
             fp8_matmul: bool = False, serving_order: bool = False) -> "ElasticEngine":
        """compact_views=False: views of budgets with heads kept per group run grouped bmm products
        over the parent's tensors instead of holding copies of those parts (views.budget_view).
        fp8_matmul: every trained budget multiplies in FP8 (`use_fp8_matmuls`).
        serving_order=False: the parent keeps its heads as loaded, and a budget that keeps heads per group holds
        copies of those parts (compact views) instead of the order's reorders at every token (order.py)."""
        ckpt = load_elastic(path, dtype=dtype, device=device)
        if ckpt.tokenizer is None:
            raise StarElasticError(f"{path}: no tokenizer files in the checkpoint")
        ckpt.model.requires_grad_(False)
        engine = cls(ckpt, serving_order=serving_order)  # subclasses (BatchedEngine) take their own arguments too
        engine.compact_views = compact_views  # read when views are built, on first use
        if fp8_matmul:
            engine.use_fp8_matmuls()
        return engine

    def use_fp8_matmuls(self) -> dict:
        """FP8 matmuls in every trained budget, sharing one FP8 copy of the parent's linear weights
        (fp8.use_fp8_matmuls with the views): the views are built now, then swapped with the parent. Budgets
        between trained ones are not served afterwards (their views would slice the full-precision
        weights this frees)."""
        from ..fp8 import use_fp8_matmuls

        if self.ckpt.delta is not None:
            raise StarElasticError("FP8 matmuls with a full budget's delta (full_delta.safetensors) are not built: "
                                   "serve this checkpoint in its own dtype")
        views = [self.view(b) for b in self.budgets]
        self.fp8_info = use_fp8_matmuls(self.parent, views=views)
        return self.fp8_info

    @property
    def device(self):
        return self.parent.lm_head.weight.device

    @property
    def context_length(self) -> int:
        return int(self.parent.config.max_position_embeddings)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.parent.config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        tok = getattr(self.tokenizer, "eos_token_id", None)
        return ids + ([tok] if tok is not None and tok not in ids else [])

    def view(self, budget: str) -> Model:
        """The model of a trained budget, or of one between two trained ones (the router's architecture
        for it, `ElasticCheckpoint.spec`); StarElasticError for any other name."""
        budget = str(budget)
        with self.view_lock:
            if budget not in self.views:
                if self.fp8_info is not None:
                    raise StarElasticError(f"budget {budget}: with FP8 matmuls only the trained budgets are served "
                                           f"({', '.join(self.budgets)})")
                spec = self.ckpt.spec(budget)
                if self.serving_order and not serving_order_fits(self.parent.config, [spec]):
                    raise StarElasticError(f"budget {budget}: its architecture drops whole KV groups or Mamba "
                                           "channels, which views of this server's head order cannot express; "
                                           "slice it to a checkpoint instead")
                # the parent itself for a budget that keeps everything: one set of caches, not two
                self.views[budget] = self.parent if not spec.to_dict() else budget_view(self.parent, spec,
                                                                                        compact=self.compact_views)
            return self.views[budget]

    # ------------------------------------------------------------------------- generation

    def _exclusive(self):
        """Held around a whole generation (both phases of think_then_answer): the one-at-a-time lock."""
        return self.lock

    def _generate(self, model: Model, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int | None, stops: list[str], on_token, eos: list[int],
                  cancel: threading.Event | None = None) -> tuple[list[int], str]:
        watcher = StopWatcher(self.tokenizer, stops, on_token, cancel)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        out = generate(model, ids.to(self.device), max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_token_id=eos, generator=gen, on_token=watcher)
        new = out[0, ids.shape[-1]:].tolist()
        reason = "stop" if watcher.hit is not None or (new and new[-1] in eos) else "length"
        return new, reason

    def generate(self, budget: str, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 on_token=None, cancel: threading.Event | None = None) -> Generation:
        """Continue one prompt (1, t) at `budget`. `on_token(id)` sees every new token as it comes
        (returning True stops); `stop` strings end the generation once they appear; setting `cancel`
        (from any thread) ends it at the next token."""
        model = self.view(budget)
        with self._exclusive():
            t0 = time.perf_counter()
            tokens, reason = self._generate(model, ids, max_new_tokens, temperature, top_p, seed, stop or [],
                                            on_token, self.eos_ids, cancel)
            return Generation(tokens, reason, time.perf_counter() - t0)

    def think_then_answer(self, ids: torch.Tensor, think_budget: str, answer_budget: str, max_think_tokens: int,
                          max_answer_tokens: int, marker: str = DEFAULT_MARKER, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int | None = None, on_token=None,
                          cancel: threading.Event | None = None) -> Generation:
        """Reason with `think_budget` until `marker` appears in its text (or EOS, or `max_think_tokens`),
        then answer with `answer_budget`, which prefills prompt + thinking. A thinking phase that ends
        without the marker gets the marker appended, so the answer starts after a closed thought.
        `on_token(id, phase)` sees the tokens of both phases ("think", then "answer")."""
        think, answer = self.view(think_budget), self.view(answer_budget)  # unknown names fail first
        marker_ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        with self._exclusive():
            t0 = time.perf_counter()
            cb = None if on_token is None else (lambda tok: on_token(tok, "think"))
            thought, reason = self._generate(think, ids, max_think_tokens, temperature, top_p, seed,
                                             [marker] if marker else [], cb, self.eos_ids, cancel)
            if reason == "stop" and thought and thought[-1] in self.eos_ids:
                thought = thought[:-1]  # the small model ended without closing its thought
                reason = "length"
            if reason == "length" and marker_ids:
                thought = thought + list(marker_ids)
                if on_token is not None:
                    for tok in marker_ids:
                        on_token(tok, "think")
            t1 = time.perf_counter()
            prefix = torch.cat([ids.view(1, -1).to(self.device), torch.tensor([thought], device=self.device,
                                                                             dtype=torch.long)], dim=1)
            cb = None if on_token is None else (lambda tok: on_token(tok, "answer"))
            tokens, reason = self._generate(answer, prefix, max_answer_tokens, temperature, top_p, seed, [], cb,
                                            self.eos_ids, cancel)
            t2 = time.perf_counter()
        return Generation(tokens, reason, t2 - t0, thinking=thought, think_seconds=t1 - t0)
