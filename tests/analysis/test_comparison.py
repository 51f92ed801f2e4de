"""Method against method: synthetic pairs with a known difference, by hand."""

import json

import numpy as np
import pandas as pd
import pytest

from kvsweep.analysis.comparison import Curve, compare_methods, interpolation_weights, not_along_the_axis, ordered_pairs
from kvsweep.stages.comparison import per_document_losses

from conftest import kvsweep

N_DOCS = 24


def result(doc, nll, kept_c, total_c=200, n=100):
    return {"id": f"d{doc:02d}", "n_tokens": n + 1, "nll_sum": nll, "n_predicted": n, "kv_kept": kept_c + 50,
            "kv_total": total_c + 50, "kv_kept_compressible": kept_c, "kv_total_compressible": total_c}  # fmt: skip


def synthetic(losses: dict, noise: dict, lengths=None) -> pd.DataFrame:
    """losses: method -> {density: per-token loss at that density, the same for every document};
    noise: method -> per-document offsets added to every configuration of the method."""
    rows = []
    for doc in range(N_DOCS):
        n = 100 if lengths is None else lengths[doc] - 1
        rows.append({**result(doc, 300.0, 200, n=n), "method": "baseline", "value": None})
        for method, curve in losses.items():
            for k, (density, loss) in enumerate(sorted(curve.items())):
                extra = (loss + noise[method][doc]) * n
                rows.append({**result(doc, 300.0 + extra, round(200 * density), n=n), "method": method,
                             "value": str(k)})  # fmt: skip
    return pd.DataFrame(rows)


def noise(seed, scale=0.002):
    return np.random.default_rng(seed).normal(0, scale, N_DOCS)


def test_interpolation_weights_are_linear():
    densities = np.array([0.2, 0.5, 1.0])
    assert interpolation_weights(densities, 0.35) @ np.array([4.0, 1.0, 0.0]) == pytest.approx(2.5)
    assert list(interpolation_weights(densities, 0.5)) == [0.0, 1.0, 0.0]


def test_a_known_difference_gets_its_sign_value_verdict_and_interval():
    """h2o loses 0.01 nats/token at density 0.4 and 0.02 at 0.2; kvzap twice that, plus noise
    per document. At 0.3 (between the points) the difference is -0.015 plus the mean noise."""
    n_h2o, n_kvzap = noise(1), noise(2)
    rows = per_document_losses(
        synthetic({"h2o": {0.2: 0.02, 0.4: 0.01}, "kvzap": {0.2: 0.04, 0.4: 0.02}}, {"h2o": n_h2o, "kvzap": n_kvzap}),
        "perplexity",
    )
    points, areas = compare_methods(rows, {}, grid=[0.3, 0.6], edges=[], n_resamples=2000)
    at = points.set_index("density")
    expected = -0.015 + n_h2o.mean() - n_kvzap.mean()
    assert (at.loc[0.3, "method_a"], at.loc[0.3, "method_b"]) == ("h2o", "kvzap")
    assert at.loc[0.3, "difference"] == pytest.approx(expected, abs=1e-9)
    assert at.loc[0.3, "difference_ci_low"] < expected < at.loc[0.3, "difference_ci_high"] < 0
    assert at.loc[0.3, "verdict"] == "h2o better"
    # At 0.6 each curve runs from its 0.4 point to the baseline at density 1: loss 2/3 of it.
    assert at.loc[0.6, "loss_a"] == pytest.approx((0.01 + n_h2o.mean()) * 2 / 3)
    # Areas over [0.2, 1]: trapezoids by hand, 0.2 * (0.02 + 0.01) / 2 + 0.6 * 0.01 / 2 = 0.006 for h2o.
    area = areas.iloc[0]
    noise_area = 0.2 * 1 + 0.6 / 2  # a document's offset is whole up to density 0.4, then fades to 0 at 1
    assert area.density_low == pytest.approx(0.2)
    assert area.auc_a == pytest.approx(0.006 + n_h2o.mean() * noise_area, rel=1e-9)
    assert area.auc_b == pytest.approx(0.012 + n_kvzap.mean() * noise_area, rel=1e-9)
    assert area.verdict == "h2o better" and area.difference_ci_high < 0


def test_equal_methods_are_no_significant_difference():
    shared = noise(3)
    rows = per_document_losses(
        synthetic({"h2o": {0.3: 0.02}, "kvzap": {0.3: 0.02}}, {"h2o": shared + noise(4, 0.001), "kvzap": shared}),
        "perplexity",
    )
    points, _ = compare_methods(rows, {}, grid=[0.5], edges=[], n_resamples=2000)
    row = points.iloc[0]
    assert row.difference_ci_low < 0 < row.difference_ci_high and row.verdict == "no significant difference"


def test_only_densities_both_methods_reach_are_compared():
    rows = per_document_losses(
        synthetic({"h2o": {0.1: 0.05, 0.5: 0.01}, "kvzap": {0.4: 0.02}}, {"h2o": noise(5), "kvzap": noise(6)}),
        "perplexity",
    )
    points, areas = compare_methods(
        rows,
        {"h2o": [0.25, 0.39], "kvzap": [0.395]},
        grid=[0.2, 0.3, 0.4, 0.7],
        edges=[],
        tolerance=0.01,
        n_resamples=200,
    )
    # 0.2, 0.25, 0.3 and h2o's target 0.39 lie below kvzap's lowest density, 0.4; kvzap's own
    # target 0.395 lies within the tolerance of it and is compared there.
    assert list(points.density) == [0.395, 0.4, 0.7]
    first = points.iloc[0]
    assert (first.density_a, first.density_b) == (0.395, 0.4)
    assert first.loss_b == pytest.approx(points.iloc[1].loss_b)
    assert areas.iloc[0].density_low == pytest.approx(0.4)


def test_the_same_table_by_document_length():
    lengths = [1000 + 400 * i for i in range(N_DOCS)]  # 1,000 to 10,200 tokens
    rows = per_document_losses(
        synthetic({"h2o": {0.3: 0.02}, "kvzap": {0.3: 0.03}}, {"h2o": noise(7), "kvzap": noise(8)}, lengths),
        "perplexity",
    )
    points, _ = compare_methods(rows, {}, grid=[0.5], edges=[4096, 8192], n_resamples=200)
    counts = dict(zip(points.length_bucket, points.n_docs, strict=True))
    assert counts == {"all": 24, "<4096": 8, "4096-8191": 10, ">=8192": 6}


def test_h2o_against_kvzap_variants_comes_first():
    """Then the other pairs, with an H2O-like method as method_a wherever one takes part."""
    assert ordered_pairs(["kvzap", "baseline_like", "h2o", "kvzap_no_sink"]) == [
        ("h2o", "kvzap"), ("h2o", "kvzap_no_sink"), ("baseline_like", "kvzap"), ("baseline_like", "kvzap_no_sink"),
        ("h2o", "baseline_like"), ("kvzap", "kvzap_no_sink"),
    ]  # fmt: skip


def test_curve_passes_through_the_baseline_at_density_one():
    rows = per_document_losses(synthetic({"h2o": {0.5: 0.02}}, {"h2o": np.zeros(N_DOCS)}), "perplexity")
    curve = Curve(rows[rows.method == "h2o"], "kv_density_compressible", [f"d{i:02d}" for i in range(N_DOCS)])
    assert list(curve.densities) == [0.5, 1.0]
    assert curve.at(0.75) == pytest.approx(np.full(N_DOCS, 1.0))  # half of 0.02 x 100 tokens


@pytest.mark.parametrize(("task", "protocol"), [("perplexity", "streaming"), ("perplexity_kvpress", "kvpress")])
def test_command_line_writes_the_tables(tmp_path, task, protocol):
    frame = synthetic({"h2o": {0.2: 0.02, 0.4: 0.01}, "kvzap": {0.3: 0.02}}, {"h2o": noise(9), "kvzap": noise(10)})
    paths = []
    for (method, threshold), group in frame.groupby(["method", frame.value.fillna("none")]):
        path = tmp_path / task / method / threshold / "shard000.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(
            "".join(json.dumps(r) + "\n" for r in group.drop(columns=["method", "value"]).to_dict("records"))
        )
        paths.append(str(path))
    calibration = tmp_path / "calibration" / "kvzap" / "0.3.json"  # the method is its folder
    calibration.parent.mkdir(parents=True)
    calibration.write_text(json.dumps({"method": "kvzap", "target_density": 0.35, "threshold": "0"}))
    out = {name: str(tmp_path / name) for name in ("c.csv", "a.csv", "c.md")}
    kvsweep("comparison", "--inputs", *paths, "--calibrations", calibration, "--grid", "0.5", "--length-buckets",
            "--output-csv", out["c.csv"], "--output-auc-csv", out["a.csv"], "--output-md", out["c.md"],
            "--n-resamples", "200", "--task", task)  # fmt: skip
    points, areas = pd.read_csv(out["c.csv"]), pd.read_csv(out["a.csv"])
    assert list(points.density) == [0.35, 0.5]  # the target density joins the grid
    assert "## Area under the quality-loss curve" in (tmp_path / "c.md").read_text()
    assert f"# {task} ({protocol} protocol)" in (tmp_path / "c.md").read_text()
    assert len(areas) == 1
    # Each row says which protocol measured it, after the pair of methods.
    for table in (points, areas):
        assert list(table.columns[:3]) == ["method_a", "method_b", "protocol"] and set(table.protocol) == {protocol}


def test_methods_whose_points_do_not_spread_along_the_axis_are_left_out():
    """StreamingLLM keeps nothing of its compressible region at any window: on the compressible
    density it has no curve (on the whole cache's density it has)."""

    def row(method, value, kept_c, kept):
        return {"method": method, "value": value, "kv_kept_compressible": kept_c, "kv_total_compressible": 100,
                "kv_kept": kept, "kv_total": 200}  # fmt: skip

    rows = pd.DataFrame(
        [row("streaming_llm", "64", 0, 70), row("streaming_llm", "192", 0, 120)]
        + [row("h2o", "0.1", 30, 130), row("h2o", "0.2", 60, 160)]
        + [row("one_point_twice", "1", 50, 150), row("one_point_twice", "2", 50, 150)]
        # Two thresholds that both evict nothing, and a third that does: a curve all the same.
        + [row("kvzap", "-inf", 100, 200), row("kvzap", "-20", 100, 200), row("kvzap", "0", 40, 140)]
    )
    left_out = not_along_the_axis(rows, "kv_density_compressible")
    assert sorted(left_out) == ["one_point_twice", "streaming_llm"]
    assert "64: 0" in left_out["streaming_llm"] and "compare on kv_density" in left_out["streaming_llm"]
    assert sorted(not_along_the_axis(rows, "kv_density")) == ["one_point_twice"]


def test_a_methods_compression_ratios_are_a_curve_of_their_own(tmp_path):
    """kvpress's fixed budgets are another policy than the method's thresholds: comparison.csv
    compares `<method>@ratio` as a method of its own, and the thresholds' curve does not pass
    through the ratio's point (adding a ratio leaves the thresholds' comparison as it was)."""
    frame = synthetic({"h2o": {0.2: 0.02, 0.6: 0.01}, "kvzap": {0.3: 0.02, 0.7: 0.01}, "h2o_ratio": {0.4: 0.05}},
                      {"h2o": noise(9), "kvzap": noise(10), "h2o_ratio": noise(11)})  # fmt: skip

    def write(frame, folder):
        paths = []
        for (method, value), group in frame.groupby(["method", frame.value.fillna("none")]):
            name, value = ("h2o", "ratio_0.5") if method == "h2o_ratio" else (method, value)
            path = tmp_path / folder / "perplexity_kvpress" / name / value / "shard000.jsonl"
            path.parent.mkdir(parents=True)
            path.write_text(
                "".join(json.dumps(r) + "\n" for r in group.drop(columns=["method", "value"]).to_dict("records"))
            )
            paths.append(str(path))
        out = [str(tmp_path / folder / name) for name in ("c.csv", "a.csv", "c.md")]
        kvsweep("comparison", "--inputs", *paths, "--grid", "0.5", "--length-buckets", "--output-csv", out[0],
                "--output-auc-csv", out[1], "--output-md", out[2], "--n-resamples", "200", "--task",
                "perplexity_kvpress")  # fmt: skip
        return pd.read_csv(out[0])

    with_ratio = write(frame, "with")
    without = write(frame[frame.method != "h2o_ratio"], "without")
    pairs = set(zip(with_ratio.method_a, with_ratio.method_b, strict=True))
    assert ("h2o@ratio", "kvzap") in pairs and ("h2o", "h2o@ratio") in pairs
    thresholds = with_ratio[(with_ratio.method_a == "h2o") & (with_ratio.method_b == "kvzap")]
    pd.testing.assert_frame_equal(thresholds.reset_index(drop=True), without.reset_index(drop=True))
