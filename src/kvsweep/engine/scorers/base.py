"""What `StreamingThresholdPress` asks of a scorer: the contract, written once.

A scorer is a kvpress press (its `score(module, hidden_states, keys, values, attentions, kwargs)`
gives one score per KV head and position) and a `StreamingScorer`, whose class attributes say when
and from what the press takes the score:

- `scores_on_entry`: once, when the token enters the cache (KVzap, key norm, random,
  StreamingLLM). The press stores the pass's scores (`score_into` may write them itself) and
  decides on them when the token leaves the window. Otherwise the score is taken at decision time:
- `accumulates_attention`: from the attention each key has received so far, which the masked
  attention sums pass by pass (H2O); `score` gets those sums as `attentions` and
  `kwargs["n_queries"]`;
- neither: from the cache as it is at decision time, over every visible key (Expected
  Attention): `score` gets the cache's keys and values up to the pass, `kwargs["slot_range"]`,
  `kwargs["visible"]`, `kwargs["tokens"]`.
- `observes_queries`: `observe` is called on every pass with its hidden states (Expected
  Attention's running query statistics).
- `reads_cache`: a scorer on entry reads the pass's keys and values (False: the hidden states
  only, and the press gathers none).
- `selects_at_ratio`: at a fixed ratio the scorer chooses the evicted entries itself, from passes
  of its own over each context that `prepare_contexts(model, contexts, ratio)` runs before the
  context's pass (KVzip: one budget over every layer and head); `selected(module, position)`
  gives them, and `forget_contexts()` drops them when the batch is done.

`allocate(module, layout)` returns what the scorer keeps per layer for a batch (passed back as
`kwargs["scorer_state"]`), or None. `score_into` and `decides_in_kernel` let the engine run a
scorer's own arithmetic in kvsweep's kernels; their defaults run `score`.

Any other kvpress `ScorerPress` is taken as it is (`as_streaming_scorer`): scored on entry, from
the pass's keys and values, unless the press declares the traits above itself.
"""

from typing import ClassVar

import torch
from kvpress.presses.scorer_press import ScorerPress
from torch import nn


class StreamingScorer:
    """The traits and hooks of a scorer; see the module's docstring. Mixed into a kvpress press."""

    scores_on_entry: ClassVar[bool] = True
    accumulates_attention: ClassVar[bool] = False
    observes_queries: ClassVar[bool] = False
    reads_cache: ClassVar[bool] = True
    selects_at_ratio: ClassVar[bool] = False

    def prepare_contexts(self, model: nn.Module, contexts: list[list[int]], ratio: float) -> None:
        """Before the context's pass at a fixed ratio, outside the press's hooks (`selects_at_ratio`)."""

    def forget_contexts(self) -> None:
        """Drop what `prepare_contexts` kept: its batch is done (the press's hooks are removed)."""

    def allocate(self, module: nn.Module, layout) -> object | None:
        """What the scorer keeps for one layer over a batch laid out as `layout` (None: nothing)."""
        return None

    def observe(self, module: nn.Module, hidden_states: torch.Tensor, state, counted: torch.Tensor) -> None:
        """Every pass, for a scorer that `observes_queries`: `counted` (batch, q) is 1 for a query that counts."""

    def score_into(self, module: nn.Module, hidden_states, entry_scores, query_slots) -> bool:
        """Write the pass's scores straight into the layer's float32 `entry_scores` at `query_slots`
        and return True, or return False for the press to ask `score`."""
        return False

    def decides_in_kernel(self) -> bool:
        """Whether the decision kernel may compute this scorer's score itself (H2O's mean attention)."""
        return False


def own_method(instance, name: str, defined_by: type) -> bool:
    """Whether `instance.<name>` is still `defined_by`'s: no subclass and no assignment on the
    instance replaced it (a kernel that computes a scorer's arithmetic is only right for that)."""
    return getattr(getattr(instance, name), "__func__", None) is vars(defined_by)[name]


class PressScorer(StreamingScorer):
    """A kvpress press that is not a `StreamingScorer`, with the contract's defaults for what it
    does not declare (`scores_on_entry` unless it says otherwise)."""

    def __init__(self, press: ScorerPress):
        self.press = press
        for trait in (
            "scores_on_entry",
            "accumulates_attention",
            "observes_queries",
            "reads_cache",
            "selects_at_ratio",
        ):
            setattr(self, trait, getattr(press, trait, getattr(StreamingScorer, trait)))
        for hook in (
            "allocate",
            "observe",
            "score_into",
            "decides_in_kernel",
            "prepare_contexts",
            "selected",
            "forget_contexts",
        ):
            if callable(getattr(press, hook, None)):
                setattr(self, hook, getattr(press, hook))

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        return self.press.score(module, hidden_states, keys, values, attentions, kwargs)

    def post_init_from_model(self, model) -> None:
        self.press.post_init_from_model(model)

    def __repr__(self) -> str:
        return repr(self.press)


def as_streaming_scorer(press) -> StreamingScorer | None:
    """`press` itself if it is a `StreamingScorer` (or None), a kvpress `ScorerPress` in a
    `PressScorer`; anything else is refused with a TypeError."""
    if press is None or isinstance(press, StreamingScorer):
        return press
    if isinstance(press, ScorerPress):
        return PressScorer(press)
    raise TypeError(
        f"{type(press).__name__} is neither a kvpress ScorerPress nor a kvsweep StreamingScorer: "
        "StreamingThresholdPress needs a score per KV head and position (kvsweep.engine.scorers.base)"
    )
