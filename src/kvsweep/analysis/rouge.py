"""ROUGE as the summarization literature reports it on GovReport.

- `longbench_rouge_l`: LongBench's metric for gov_report: ROUGE-L F1 from the `rouge` package,
  max over the references, x100; an empty or unscorable prediction scores 0 (as LongBench does).
- `rouge_score_f1`: ROUGE-1, ROUGE-2 and ROUGE-Lsum F1 from Google's `rouge-score` (with stemming),
  max over the references, x100; SCROLLS reports the geometric mean of ROUGE-1/2/L.
"""

from functools import lru_cache

from rouge import Rouge
from rouge_score import rouge_scorer

ROUGE_SCORE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def longbench_rouge_l(prediction: str, references: list[str]) -> float:
    best = 0.0
    for reference in references:
        try:
            score = Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
        except (ValueError, RecursionError):  # empty hypothesis or reference, as LongBench returns 0
            score = 0.0
        best = max(best, score)
    return 100 * best


@lru_cache(maxsize=1)
def _scorer():
    return rouge_scorer.RougeScorer(list(ROUGE_SCORE_TYPES), use_stemmer=True)


def rouge_score_f1(prediction: str, references: list[str]) -> dict[str, float]:
    best = dict.fromkeys(ROUGE_SCORE_TYPES, 0.0)
    for reference in references:
        # rougeLsum treats newlines as sentence boundaries; texts are scored as they are.
        scores = _scorer().score(reference, prediction)
        for key in ROUGE_SCORE_TYPES:
            best[key] = max(best[key], scores[key].fmeasure)
    return {key: 100 * value for key, value in best.items()}
