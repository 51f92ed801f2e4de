"""Method against method at equal KV budget: the quality difference between two compressed
methods at common densities, with a paired bootstrap interval over documents, and each method's
area under its quality-loss curve.

Quality loss of a document under a configuration: its NLL sum minus the baseline's (perplexity;
aggregated as nats per predicted token) or the baseline's ROUGE-L minus its own (summarization;
points, averaged over documents). Each method's curve runs through its configurations at their
densities (token-weighted over the documents, on the `--density` axis) and through the baseline
at density 1, loss 0. At a density x the loss of every document is interpolated linearly between
the two configurations that bracket x (the weights come from the aggregate densities, the same for
every document), so the difference between two methods at x is a statistic over paired per-document
values and the bootstrap resamples documents. Common densities: the grid and the target densities
that lie in the range both methods cover, [the larger of their lowest densities, 1]; a method's own
target that lies up to `--tolerance` below its lowest density (calibrated on other documents, it
landed a little above the target on these) is compared at that lowest point, and `density_a` /
`density_b` say where each method was read. The area under
a loss curve is the integral of the interpolated loss over that range (exact: the curves are
piecewise linear). Verdict: a method is better where the interval of the difference excludes 0.
The same tables are made per document-length bucket, where H2O's position dependence shows.
"""

import itertools

import numpy as np
import pandas as pd

from kvsweep.analysis.bootstrap import bootstrap_interval
from kvsweep.study.tasks import get_task

POINT_COLUMNS = ["method_a", "method_b", "length_bucket", "n_docs", "density", "density_a", "density_b", "loss_a",
                 "loss_b", "difference",
                 "difference_ci_low", "difference_ci_high", "verdict"]  # fmt: skip
AUC_COLUMNS = ["method_a", "method_b", "length_bucket", "n_docs", "density_low", "density_high", "auc_a", "auc_a_ci_low",
               "auc_a_ci_high", "auc_b", "auc_b_ci_low", "auc_b_ci_high", "difference", "difference_ci_low",
               "difference_ci_high", "verdict"]  # fmt: skip
DEFAULT_GRID = [round(0.1 * i, 1) for i in range(1, 10)]


def interpolation_weights(densities: np.ndarray, x: float) -> np.ndarray:
    """w with w @ values = the piecewise-linear curve through (densities, values) at x (densities
    sorted ascending, x within their range)."""
    weights = np.zeros(len(densities))
    upper = int(np.searchsorted(densities, x, side="left"))
    if upper < len(densities) and densities[upper] == x:
        weights[upper] = 1.0
        return weights
    lower = upper - 1
    share = (x - densities[lower]) / (densities[upper] - densities[lower])
    weights[lower], weights[upper] = 1.0 - share, share
    return weights


class Curve:
    """One method's per-document losses at its configurations plus the baseline anchor (density
    1, loss 0), ordered by density."""

    def __init__(self, rows: pd.DataFrame, density: str, documents: list[str]):
        densities, columns = [], []
        for _, group in rows.groupby("value"):
            group = group.set_index("id").loc[documents]
            kept, total = (
                f"kv_kept{density.removeprefix('kv_density')}",
                f"kv_total{density.removeprefix('kv_density')}",
            )
            densities.append(group[kept].sum() / group[total].sum())
            columns.append(group.loss.to_numpy(dtype=float))
        densities.append(1.0)
        columns.append(np.zeros(len(documents)))
        order = np.argsort(densities, kind="stable")
        self.densities = np.asarray(densities)[order]
        self.losses = np.stack(columns, axis=1)[:, order]  # (documents, points)

    def at(self, x: float) -> np.ndarray:
        """Per-document loss at density x."""
        return self.losses @ interpolation_weights(self.densities, x)

    def area(self, low: float, high: float, knots: np.ndarray) -> np.ndarray:
        """Per-document integral of the loss over [low, high]; `knots` holds every breakpoint."""
        xs = np.unique(np.clip(np.concatenate([knots, [low, high]]), low, high))
        values = np.stack([self.at(x) for x in xs], axis=1)
        return ((values[:, 1:] + values[:, :-1]) / 2 * np.diff(xs)).sum(axis=1)


def _ratio(a, w, axis=-1):
    return a.sum(axis=axis) / w.sum(axis=axis)


def _difference(a, b, w, axis=-1):
    return (a.sum(axis=axis) - b.sum(axis=axis)) / w.sum(axis=axis)


def verdict(low: float, high: float, a: str, b: str) -> str:
    """The difference is a's loss minus b's: above 0, b loses less."""
    if high < 0:
        return f"{a} better"
    if low > 0:
        return f"{b} better"
    return "no significant difference"


def ordered_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """H2O against each KVzap variant first, then every other pair (H2O-like methods as a)."""

    def key(pair):
        a, b = pair
        return (not (a.startswith("h2o") and b.startswith("kvzap")), a, b)

    pairs = []
    for a, b in itertools.combinations(sorted(methods), 2):
        pairs.append((b, a) if b.startswith("h2o") and not a.startswith("h2o") else (a, b))
    return sorted(pairs, key=key)


def length_buckets(lengths: pd.Series, edges: list[int]) -> dict[str, pd.Index]:
    """'all' and, per bucket of document length that holds at least 2 documents, its documents."""
    buckets = {"all": lengths.index}
    bounds = [0, *sorted(edges), None]
    for low, high in itertools.pairwise(bounds):
        inside = lengths[(lengths >= low) & (lengths < high if high is not None else True)]
        label = f"<{high}" if low == 0 else (f">={low}" if high is None else f"{low}-{high - 1}")
        if len(inside) >= 2 and len(inside) < len(lengths):
            buckets[label] = inside.index
    return buckets


def compare_methods(
    rows: pd.DataFrame,
    targets: dict[str, list[float]],
    density: str = "kv_density_compressible",
    grid: list[float] = DEFAULT_GRID,
    edges: list[int] = (4096, 8192),
    tolerance: float = 0.01,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pointwise and the area tables, for every pair of compressed methods and length bucket."""
    points, areas = [], []
    lengths = rows.drop_duplicates("id").set_index("id").length
    weights = rows.drop_duplicates("id").set_index("id").weight
    methods = sorted(rows.method.unique())
    for bucket, documents in length_buckets(lengths, list(edges)).items():
        documents = list(documents)
        w = weights.loc[documents].to_numpy(dtype=float)
        curves = {m: Curve(rows[(rows.method == m) & rows.id.isin(documents)], density, documents) for m in methods}
        for a, b in ordered_pairs(methods):
            ca, cb = curves[a], curves[b]
            low = max(ca.densities[0], cb.densities[0])
            common = {"method_a": a, "method_b": b, "length_bucket": bucket, "n_docs": len(documents)}
            compressible = density.endswith("compressible")
            own = {m: set(targets.get(m, [])) if compressible else set() for m in (a, b)}
            for x in sorted(set(grid) | own[a] | own[b]):
                # A method's own target may lie just below its lowest point on these documents (it
                # was calibrated on others): within the tolerance, that point stands for it. Any
                # other density must lie on both curves.
                reached = [x >= c.densities[0] or (x in own[m] and x >= c.densities[0] - tolerance)
                           for m, c in ((a, ca), (b, cb))]  # fmt: skip
                if x >= 1 or not all(reached):
                    continue
                xa, xb = max(x, ca.densities[0]), max(x, cb.densities[0])
                la, lb = ca.at(xa), cb.at(xb)
                diff, ci_low, ci_high = bootstrap_interval((la, lb, w), _difference, n_resamples, confidence, seed)
                points.append({**common, "density": x, "density_a": xa, "density_b": xb, "loss_a": _ratio(la, w),
                               "loss_b": _ratio(lb, w), "difference": diff, "difference_ci_low": ci_low,
                               "difference_ci_high": ci_high, "verdict": verdict(ci_low, ci_high, a, b)})  # fmt: skip
            knots = np.concatenate([ca.densities, cb.densities])
            aa, ab = ca.area(low, 1.0, knots), cb.area(low, 1.0, knots)
            auc_a = bootstrap_interval((aa, w), _ratio, n_resamples, confidence, seed)
            auc_b = bootstrap_interval((ab, w), _ratio, n_resamples, confidence, seed)
            diff = bootstrap_interval((aa, ab, w), _difference, n_resamples, confidence, seed)
            areas.append({**common, "density_low": low, "density_high": 1.0,
                          **dict(zip(("auc_a", "auc_a_ci_low", "auc_a_ci_high"), auc_a, strict=True)),
                          **dict(zip(("auc_b", "auc_b_ci_low", "auc_b_ci_high"), auc_b, strict=True)),
                          **dict(zip(("difference", "difference_ci_low", "difference_ci_high"), diff, strict=True)),
                          "verdict": verdict(diff[1], diff[2], a, b)})  # fmt: skip
    return pd.DataFrame(points, columns=POINT_COLUMNS), pd.DataFrame(areas, columns=AUC_COLUMNS)


def not_along_the_axis(rows: pd.DataFrame, density: str) -> dict[str, str]:
    """Methods whose configurations do not spread along the density axis (all at 0, or several
    all at one density), with the reason: no curve through them can be compared. StreamingLLM on the compressible density is one: every
    position outside its sinks and window goes, so its compressible density is 0 at any window
    (`kv_density`, the whole cache, is the axis on which it compares)."""
    suffix = density.removeprefix("kv_density")
    left_out = {}
    for method, group in rows.groupby("method"):
        sums = group.groupby("value")[[f"kv_kept{suffix}", f"kv_total{suffix}"]].sum()
        values = (sums.iloc[:, 0] / sums.iloc[:, 1]).round(9)
        if (values == 0).all() or (len(values) > 1 and values.nunique() == 1):
            shown = ", ".join(f"{v}: {d:g}" for v, d in values.items())
            left_out[method] = f"its configurations do not spread along {density} ({shown}); compare on kv_density"
    return left_out


def markdown(points: pd.DataFrame, areas: pd.DataFrame, task: str, density: str, left_out=None) -> str:
    unit, protocol = get_task(task).loss_unit, get_task(task).protocol
    lines = [
        f"# {task} ({protocol} protocol): method against method at equal KV density ({density})",
        "",
        f"`difference` = loss of method_a minus loss of method_b, in {unit} (loss: against the baseline on the "
        "same documents; below 0 means method_a loses less). Interval: paired percentile bootstrap over documents.",
        "",
    ]
    if left_out:
        lines += ["Left out: " + "; ".join(f"`{m}`: {why}" for m, why in left_out.items()) + ".", ""]
    lines += ["## At common densities", ""]
    for bucket, table in points.groupby("length_bucket", sort=False):
        lines += [
            f"### documents: {bucket}",
            "",
            table.drop(columns="length_bucket").to_markdown(index=False, floatfmt=".4g"),
            "",
        ]
    lines += ["## Area under the quality-loss curve over the common range", ""]
    lines += [areas.to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines)
