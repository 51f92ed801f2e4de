"""The result lines of evaluation jobs: their fields per task, and the length fields that tell
whether two methods read the same document."""

RESULT_FIELDS = {
    "perplexity": {"id", "n_tokens", "nll_sum", "n_predicted", "kv_kept", "kv_total", "kv_kept_compressible",
                   "kv_total_compressible"},
    "summarization": {"id", "generated", "references", "n_generated", "n_prompt_tokens", "kv_kept", "kv_total",
                      "kv_kept_compressible", "kv_total_compressible"},
}  # fmt: skip


def read_calibrations(paths) -> list[dict]:
    """The records of calibration jobs (calibration/<method>/<target>.json): method (the config
    entry, from the path: the record names the method it ran), target_density, threshold
    (canonical), density, steps, documents."""
    import json
    from pathlib import Path

    return [{**json.loads(Path(path).read_text()), "method": Path(path).parent.name} for path in paths]


# A document's input length: two results with different lengths were computed on different inputs.
LENGTH_FIELD = {"perplexity": "n_tokens", "summarization": "n_prompt_tokens"}
