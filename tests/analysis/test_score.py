"""Scoring: hand-computed aggregates, the paired bootstrap, and table order."""

import json
import math

import pytest

from kvsweep.analysis.results import load_results
from kvsweep.core.errors import KvsweepError
from kvsweep.study.tasks import get_task
from kvsweep.tasks import work_of

from conftest import kvsweep

summarize = work_of("perplexity").summarize
COLUMNS = list(get_task("perplexity").summary_columns)


def write(tmp_path, method, threshold, docs):
    path = tmp_path / "perplexity" / method / threshold / "shard000.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def doc(i, nll, n, kept, total=100, kept_c=None, total_c=80):
    return {"id": f"d{i}", "n_tokens": n + 1, "nll_sum": nll, "n_predicted": n, "kv_kept": kept, "kv_total": total,
            "kv_kept_compressible": kept - 20 if kept_c is None else kept_c, "kv_total_compressible": total_c}  # fmt: skip


@pytest.fixture
def results(tmp_path):
    base = [doc(0, 10.0, 9, 100), doc(1, 20.0, 19, 100), doc(2, 30.0, 29, 100), doc(3, 12.0, 10, 100)]
    h2o_a = [doc(0, 11.0, 9, 60), doc(1, 22.0, 19, 50), doc(2, 30.0, 29, 40), doc(3, 12.5, 10, 50)]
    h2o_b = [doc(0, 10.5, 9, 90), doc(1, 20.5, 19, 90), doc(2, 30.5, 29, 90), doc(3, 12.0, 10, 90)]
    paths = [write(tmp_path, "baseline", "none", base), write(tmp_path, "h2o", "0.0003", h2o_a),
             write(tmp_path, "h2o", "1e-05", h2o_b)]  # fmt: skip
    return load_results(paths)


def test_aggregates_by_hand(results):
    table = summarize(results, n_resamples=500)
    assert list(table.columns) == COLUMNS
    assert list(zip(table.method, table.value, strict=True)) == [
        ("baseline", ""),
        ("h2o", "1e-05"),
        ("h2o", "0.0003"),
    ]
    base, small, large = (table.iloc[i] for i in range(3))
    assert base.nll == pytest.approx(72 / 67) and base.ppl == pytest.approx(math.exp(72 / 67))
    assert base.delta_nll == 0 and base.kv_density == 1
    assert large.delta_nll == pytest.approx((75.5 - 72) / 67)
    assert large.kv_density == pytest.approx(200 / 400)
    assert large.kv_density_compressible == pytest.approx((40 + 30 + 20 + 30) / 320)
    assert small.delta_nll == pytest.approx(1.5 / 67)
    assert (large.n_docs, large.n_tokens) == (4, 67)


def test_bootstrap_interval(results):
    table = summarize(results, n_resamples=2000, seed=1).set_index("value")
    row = table.loc["0.0003"]
    assert row.delta_nll_ci_low < row.delta_nll < row.delta_nll_ci_high
    assert row.delta_nll_ci_low >= 0  # every document got worse or stayed
    # The same seed gives the same interval; the baseline's own difference is exactly 0.
    again = summarize(results, n_resamples=2000, seed=1).set_index("value").loc["0.0003"]
    assert (again.delta_nll_ci_low, again.delta_nll_ci_high) == (row.delta_nll_ci_low, row.delta_nll_ci_high)
    assert table.loc[""].delta_nll_ci_low == table.loc[""].delta_nll_ci_high == 0


def test_missing_baseline_documents_are_an_error(tmp_path):
    paths = [write(tmp_path, "baseline", "none", [doc(0, 10.0, 9, 100)]),
             write(tmp_path, "h2o", "0.1", [doc(0, 10.0, 9, 50), doc(7, 1.0, 9, 50)])]  # fmt: skip
    with pytest.raises(
        KvsweepError, match=r"h2o at 0.1: 2 documents where the baseline has 1: 1 not among them \(d7\)"
    ):
        summarize(load_results(paths))


def test_no_baseline_is_an_error(tmp_path):
    with pytest.raises(KvsweepError, match="no baseline results"):
        summarize(load_results([write(tmp_path, "h2o", "0.1", [doc(0, 10.0, 9, 50)])]))


def test_documents_read_at_another_length_than_the_baselines_are_refused(tmp_path):
    """Results of one document at two lengths come from different inputs (a shard prepared again
    between the jobs): pairing them would compare different texts."""
    paths = [write(tmp_path, "baseline", "none", [doc(0, 10.0, 9, 100), doc(1, 10.0, 9, 100)]),
             write(tmp_path, "h2o", "0.1", [doc(0, 10.0, 9, 50), doc(1, 13.0, 12, 50)])]  # fmt: skip
    with pytest.raises(KvsweepError, match=r"h2o at 0.1: document\(s\) \['d1'\] were read with another n_tokens"):
        summarize(load_results(paths))


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": "d0", "nll_sum": 1.0\n', "line 1: not valid JSON"),
        ('{"id": "d0", "nll_sum": 1.0}\n', "line 1: missing field(s) kv_kept, kv_kept_compressible"),
        (b'{"id": "d\xff"}\n', "line 1: not valid UTF-8"),
    ],
)
def test_a_corrupted_result_file_is_one_message(tmp_path, capsys, content, message):
    good = write(tmp_path, "baseline", "none", [doc(0, 10.0, 9, 100)])
    bad = tmp_path / "perplexity" / "h2o" / "0.1" / "shard000.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SystemExit):
        kvsweep("score", "--inputs", good, bad, "--output-csv", tmp_path / "s.csv", "--output-md", tmp_path / "s.md")
    err = capsys.readouterr().err
    assert f"{bad}, {message}" in err and "Traceback" not in err


def test_compare_draws_an_interval_that_excludes_its_point(tmp_path):
    """A percentile bootstrap interval need not contain the point estimate; the figure draws it."""
    import pandas as pd

    table = pd.DataFrame([
        {"method": "baseline", "value": "", "delta_nll": 0.0, "delta_nll_ci_low": 0.0, "delta_nll_ci_high": 0.0,
         "ppl": 10.0, "kv_density": 1.0, "kv_density_compressible": 1.0},
        {"method": "h2o", "value": "0.1", "delta_nll": 0.010, "delta_nll_ci_low": 0.012,
         "delta_nll_ci_high": 0.020, "ppl": 10.1, "kv_density": 0.5, "kv_density_compressible": 0.45},
    ])  # fmt: skip
    table.to_csv(tmp_path / "summary.csv", index=False)
    kvsweep("figures", "--summary", tmp_path / "summary.csv", "--output-png", tmp_path / "f.png",
            "--output-pdf", tmp_path / "f.pdf")  # fmt: skip
    assert (tmp_path / "f.png").stat().st_size > 5000


@pytest.mark.parametrize(("task", "protocol"), [("perplexity", "streaming"), ("perplexity_kvpress", "kvpress")])
def test_tables_say_which_protocol_measured_them(tmp_path, task, protocol):
    """summary.csv carries the task's protocol after the method; provenance.csv the protocol each
    result line recorded (a line that records none ran its task's)."""
    import pandas as pd

    paths = []
    for method, value, provenance in (("baseline", "none", {"protocol": protocol, "device": "cpu"}),
                                      ("h2o", "0.1", {"device": "cpu"})):  # fmt: skip
        path = tmp_path / task / method / value / "shard000.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({**doc(0, 10.0, 9, 100 if value == "none" else 60), "provenance": provenance}))
        paths.append(path)
    out = {name: tmp_path / name for name in ("s.csv", "s.md", "p.csv")}
    kvsweep("score", "--inputs", *paths, "--task", task, "--output-csv", out["s.csv"], "--output-md", out["s.md"],
            "--output-provenance", out["p.csv"], "--n-resamples", "100")  # fmt: skip
    summary = pd.read_csv(out["s.csv"])
    assert list(summary.columns) == [COLUMNS[0], "protocol", *COLUMNS[1:]]
    assert list(summary.protocol) == [protocol, protocol] and "protocol" in out["s.md"].read_text().splitlines()[0]
    provenance = pd.read_csv(out["p.csv"])
    assert list(provenance.protocol) == [protocol, protocol] and list(provenance.device) == ["cpu", "cpu"]


def test_memory_and_decoding_speed_against_the_baselines_on_the_same_documents(tmp_path):
    """kv_memory_GiB: the mean of the documents' shares of their batches' caches; its ratio and the
    decoding speed's to the baseline's. Lines written before kvsweep recorded them give NaN."""
    gib = 2**30
    base = [{**doc(i, 10.0, 9, 100), "kv_cache_bytes": gib, "decode_tok_s": 100.0} for i in range(3)]
    kept = [{**doc(i, 11.0, 9, 30), "kv_cache_bytes": share * gib, "decode_tok_s": 150.0 + i}
            for i, share in enumerate([0.25, 0.5, 0.75])]  # fmt: skip
    older = [doc(i, 11.0, 9, 50) for i in range(3)]
    paths = [write(tmp_path, "baseline", "none", base), write(tmp_path, "h2o", "0.1", kept),
             write(tmp_path, "h2o", "0.2", older)]  # fmt: skip
    table = summarize(load_results(paths), n_resamples=100).set_index("value")
    assert table.loc["", "kv_memory_GiB"] == 1 and table.loc["", "kv_memory_vs_baseline"] == 1
    assert table.loc["0.1", "kv_memory_GiB"] == pytest.approx(0.5)
    assert table.loc["0.1", "kv_memory_vs_baseline"] == pytest.approx(0.5)
    assert math.isnan(table.loc["0.2", "kv_memory_GiB"]) and math.isnan(table.loc["0.2", "kv_memory_vs_baseline"])

    from kvsweep.analysis.results import costs

    rows = load_results(paths)
    speeds = costs(rows[rows.value == "0.1"], rows[rows.method == "baseline"], decoding=True)
    assert speeds["decode_tok_s"] == pytest.approx(151.0) and speeds["decode_vs_baseline"] == pytest.approx(1.51)


def test_the_figure_puts_quality_loss_against_memory_and_speed_where_the_summary_has_them():
    import pandas as pd

    from kvsweep.analysis.figures import plot_quality_vs_density

    rows = [{"method": "baseline", "value": "", "delta_nll": 0.0, "ppl": 10.0, "kv_density_compressible": 1.0,
             "kv_memory_vs_baseline": 1.0, "decode_vs_baseline": 1.0},
            {"method": "h2o", "value": "0.1", "delta_nll": 0.01, "ppl": 10.1, "kv_density_compressible": 0.45,
             "kv_memory_vs_baseline": 0.5, "decode_vs_baseline": 1.4}]  # fmt: skip
    table = pd.DataFrame(rows).assign(delta_nll_ci_low=0.0, delta_nll_ci_high=0.02)
    titles = [axis.get_title() for axis in plot_quality_vs_density(table, "t").axes]
    assert titles[2:] == ["Quality loss against memory", "Quality loss against speed"]
    older = table.drop(columns=["kv_memory_vs_baseline", "decode_vs_baseline"])
    assert len(plot_quality_vs_density(older, "t").axes) == 2
    memory = plot_quality_vs_density(table.assign(decode_vs_baseline=float("nan")), "t").axes[2]
    (line,) = [line for line in memory.get_lines() if line.get_label() == "h2o"]
    assert list(line.get_xdata()) == [0.5] and list(line.get_ydata()) == [0.01]
