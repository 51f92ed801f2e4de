"""Each method's press: its scorer inside `StreamingThresholdPress`, with the threshold and the
settings its declaration (`kvsweep.study.methods`) gives. One builder per method family; a named
variant (kvzap_no_sink, observed_attention) is built as its family with its own defaults.

Adding a method: a declaration in `kvsweep.study.methods`, a scorer in `kvsweep.engine.scorers`,
and its builder here (docs/contributing.md)."""

import math
from dataclasses import replace

from kvsweep.engine.press import StreamingThresholdPress
from kvsweep.engine.scorers import (
    ExpectedAttentionScorer,
    H2OScorer,
    KnormScorer,
    KVzapScorer,
    KVzipScorer,
    RandomScorer,
    SnapKVScorer,
    StreamingLLMScorer,
)
from kvsweep.study.methods import Method


def kvzap(threshold: float, sliding_window: int, sinks: int, kvzap_surrogate: str | None, kvzap_type: str):
    scorer = KVzapScorer(model_type=kvzap_type, surrogate=kvzap_surrogate)
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


def h2o(threshold: float, local_window: int, sinks: int):
    return StreamingThresholdPress(H2OScorer(), threshold=threshold, sliding_window_size=local_window, sinks=sinks)


def streaming_llm(sliding_window: int, sinks: int):
    # Every position scores 0 < +inf: each is evicted as it leaves the window (sinks excepted).
    return StreamingThresholdPress(
        StreamingLLMScorer(), threshold=math.inf, sliding_window_size=sliding_window, sinks=sinks
    )


def random(threshold: float, sliding_window: int, sinks: int, seed: int):
    return StreamingThresholdPress(
        RandomScorer(seed=seed), threshold=threshold, sliding_window_size=sliding_window, sinks=sinks
    )


def expected_attention(
    threshold: float, sliding_window: int, sinks: int, n_future_positions: int, use_covariance: bool, use_vnorm: bool
):
    scorer = ExpectedAttentionScorer(
        n_future_positions=n_future_positions, n_sink=sinks, use_covariance=use_covariance, use_vnorm=use_vnorm
    )
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


def knorm(threshold: float, sliding_window: int, sinks: int):
    return StreamingThresholdPress(KnormScorer(), threshold=threshold, sliding_window_size=sliding_window, sinks=sinks)


def snapkv(threshold: float, window_size: int, kernel_size: int):
    # kvpress's SnapKVPress protects nothing but its own window, which it scores above the rest.
    scorer = SnapKVScorer(window_size=window_size, kernel_size=kernel_size)
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=0, sinks=0)


def kvzip(threshold: float, sinks: int, layerwise: bool, kvzip_plus: bool, repeat_chunk: int):
    # KVzipPress decides from its own passes (KVzipScorer), never evicting its sinks; the press's
    # sinks leave them out of the compressible region, as for the other methods that keep them.
    scorer = KVzipScorer(
        layerwise=layerwise, n_sink=sinks, kvzip_plus_normalization=kvzip_plus, chunk_size=repeat_chunk
    )
    return StreamingThresholdPress(scorer, threshold=threshold, sliding_window_size=0, sinks=sinks)


# Method family -> builder of its press (the baseline has none: no compression).
BUILDERS = {
    "kvzap": kvzap,
    "h2o": h2o,
    "streaming_llm": streaming_llm,
    "random": random,
    "expected_attention": expected_attention,
    "knorm": knorm,
    "snapkv": snapkv,
    "kvzip": kvzip,
}


def build_press(
    method: Method,
    threshold: float | None,
    settings: dict,
    compression_ratio: float | None = None,
    adaptive_safeguard: float | None = None,
) -> StreamingThresholdPress | None:
    """The method's press (None: no compression), from `method.resolve`d settings. With
    `compression_ratio` (a method with a score, kvpress's protocol): the budget kvpress's
    `ScorerPress` sets, instead of a threshold (`StreamingThresholdPress.fixed_ratio`), shared by
    the heads of a layer as AdaKV shares it with `adaptive_safeguard`."""
    if method.sweep is None:
        return None
    builder = BUILDERS[method.variant_of or method.name]
    if compression_ratio is None:
        if adaptive_safeguard is not None:
            raise ValueError(f"{method.name}: an adaptive safeguard shares a compression ratio's budget; give one")
        if method.ratio_only:
            raise ValueError(f"{method.name} decides with a compression ratio only (kvpress's protocol)")
        return builder(threshold, **settings) if method.takes_threshold else builder(**settings)
    if not method.takes_ratios:
        raise ValueError(f"{method.name}: no score to keep the top of at a fixed ratio")
    if adaptive_safeguard is not None and not method.adaptive_budget:
        raise ValueError(f"{method.name}: its budget at a ratio is its own, not AdaKV's")
    if method.takes_threshold:
        press = builder(-math.inf, **settings)
    else:
        # The ratio sizes what is kept of the order (StreamingLLM: the most recent positions, as
        # kvpress's StreamingLLMPress keeps them): the swept setting, a window, protects nothing.
        press = builder(**{**settings, method.sweep: 0})
    # (replace: the press checks the ratio and the safeguard as it is made)
    return replace(press, fixed_ratio=compression_ratio, adaptive_safeguard=adaptive_safeguard)
