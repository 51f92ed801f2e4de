"""`kvsweep protocols`: a task's two summaries (streaming, kvpress's protocol) side by side."""

import pandas as pd
import pytest

from kvsweep.study.tasks import PERPLEXITY

from conftest import kvsweep

COLUMNS = list(PERPLEXITY.summary_columns)


def summary(path, rows):
    """A perplexity summary.csv with (method, value, delta_nll, density) rows; the rest filled."""
    table = pd.DataFrame(
        [{"method": m, "swept": "" if m == "baseline" else "threshold", "value": v, "target_density": None,
          "ppl": 2.0 + d, "nll": 0.7 + d, "delta_nll": d, "delta_nll_ci_low": d - 0.01, "delta_nll_ci_high": d + 0.01,
          "kv_density": density, "kv_density_compressible": density, "n_docs": 10, "n_tokens": 100}
         for m, v, d, density in rows],
        columns=COLUMNS,
    )  # fmt: skip
    table.to_csv(path, index=False)
    return path


def test_the_two_protocols_line_up_per_configuration(tmp_path):
    streaming = summary(tmp_path / "s.csv", [("baseline", None, 0.0, 1.0), ("kvzap", "-5", 0.02, 0.5),
                                             ("h2o", "0.001", 0.05, 0.3), ("h2o", "0.01", 0.09, 0.1)])  # fmt: skip
    kvpress = summary(tmp_path / "k.csv", [("baseline", None, 0.0, 1.0), ("kvzap", "-5", 0.03, 0.45),
                                           ("h2o", "0.001", 0.04, 0.35), ("knorm", "-3", 0.2, 0.5)])  # fmt: skip
    out = {ext: tmp_path / f"p.{ext}" for ext in ("csv", "md", "png", "pdf")}
    kvsweep("protocols", "--task", "perplexity", "--streaming", streaming, "--kvpress", kvpress,
            *[arg for ext, path in out.items() for arg in (f"--output-{ext}", path)])  # fmt: skip
    table = pd.read_csv(out["csv"], dtype={"value": str}).set_index(["method", "value"])
    assert table.loc[("kvzap", "-5"), "gap"] == pytest.approx(0.01)
    assert table.loc[("h2o", "0.001"), "gap"] == pytest.approx(-0.01)
    assert table.loc[("kvzap", "-5"), "kvpress_kv_density_compressible"] == 0.45
    assert len(table) == 3  # the baseline, kvzap -5 and h2o 0.001: the others are in one summary only
    text = out["md"].read_text()
    assert "Only in the streaming summary (not compared): h2o 0.01" in text
    assert "Only in the kvpress summary (not compared): knorm -3" in text
    assert "| 0.02 [0.01, 0.03]" in text and out["png"].stat().st_size > 0


def test_a_summary_of_another_task_is_one_message(tmp_path, capsys):
    streaming = summary(tmp_path / "s.csv", [("baseline", None, 0.0, 1.0)])
    other = tmp_path / "rouge.csv"
    pd.DataFrame({"method": ["baseline"], "rougeL": [30.0]}).to_csv(other, index=False)
    out = [arg for ext in ("csv", "md", "png", "pdf") for arg in (f"--output-{ext}", tmp_path / f"p.{ext}")]
    with pytest.raises(SystemExit):
        kvsweep("protocols", "--streaming", streaming, "--kvpress", other, *out)
    err = capsys.readouterr().err
    assert "rouge.csv: not a perplexity_kvpress summary.csv (no column swept" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()
