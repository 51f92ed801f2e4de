"""Calibration to target densities: the search on known curves, and the whole command on the
tiny model, checked against an independent evaluation at the threshold it found."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from kvsweep.analysis.calibration_search import QUANTILE_LEVELS, rounded, search
from kvsweep.core.errors import KvsweepError
from kvsweep.engine.methods import build_press
from kvsweep.engine.stream_nll import stream_nll
from kvsweep.study.methods import get_method

from conftest import kvsweep, random_documents, tiny_surrogate

PROBE = stats.norm.ppf(np.linspace(0.0005, 0.9995, QUANTILE_LEVELS))  # scores ~ N(0, 1)


def shifted_density(shift: float, scale: float = 1.0):
    """A density curve that the probe's quantiles do not predict exactly (eviction moves scores)."""
    calls = []

    def measure(threshold):
        calls.append(threshold)
        return float(1.0 - stats.norm.cdf((threshold - shift) / scale))

    return measure, calls


@pytest.mark.parametrize("target", [0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.4, 1.0), (-0.3, 0.5), (1.5, 2.0)])
def test_search_reaches_every_target_in_a_few_steps(target, shift, scale):
    measure, calls = shifted_density(shift, scale)
    found, steps = search(measure, PROBE, target, 0.01, 10, log=lambda line: None)
    assert len(calls) == len(steps) <= 8
    assert abs(found.density - target) <= 0.01
    assert found.density == measure(found.threshold)  # the density reported is the threshold's own
    spread = PROBE[-1] - PROBE[0]
    assert all(s.threshold == rounded(s.threshold, spread) for s in steps)  # a stable path for a value
    again = search(shifted_density(shift, scale)[0], PROBE, target, 0.01, 10, log=lambda line: None)[1]
    assert [(s.threshold, s.density) for s in again] == [(s.threshold, s.density) for s in steps]


def test_thresholds_are_rounded_to_what_the_scores_tell_apart():
    assert rounded(2.6973e-4, 1.0) == 0.0002697  # 4 significant digits
    assert rounded(-12.0034567, 0.02) == -12.003457  # scores of -12 +- 0.01 need more


def test_when_the_probe_is_exact_the_first_step_lands():
    measure, calls = shifted_density(0.0)
    search(measure, PROBE, 0.4, 0.01, 10, log=lambda line: None)
    assert len(calls) == 1


def test_a_density_that_jumps_over_the_target_is_one_message_naming_the_closest():
    def measure(threshold):  # half the positions share one score: the density jumps from 0.75 to 0.25
        return 0.75 if threshold <= 0.0 else 0.25

    with pytest.raises(KvsweepError) as err:
        search(measure, PROBE, 0.5, 0.01, 30, log=lambda line: None)
    message = str(err.value)
    assert message.startswith("target density 0.5 cannot be reached within 0.01: the density jumps over the target")
    assert (
        "(it falls from 0.7500 at 0 to 0.2500 at " in message and "Closest: threshold 0 with density 0.7500" in message
    )


def test_a_target_below_what_any_threshold_reaches_is_one_message():
    def measure(threshold):  # never below 0.4, as a window that protects 40% would
        return max(0.4, float(1.0 - stats.norm.cdf(threshold)))

    with pytest.raises(
        KvsweepError, match=r"target density 0.2 cannot be reached within 0.01: .*Closest: .*density 0.4000"
    ):
        search(measure, PROBE, 0.2, 0.01, 10, log=lambda line: None)


def test_steps_are_bounded():
    calls = []

    def slow(threshold):  # a density so flat that the tolerance is hard to hit
        calls.append(threshold)
        return 0.5 + 0.3 * math.tanh(-threshold * 1e-3)

    with pytest.raises(KvsweepError, match="target density 0.2 cannot be reached within 0.001"):
        search(slow, PROBE, 0.2, 0.001, 4, log=lambda line: None)
    assert len(calls) <= 4


@pytest.fixture(scope="module")
def calibration_inputs(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    model.save_pretrained(folder / "model")
    tiny_surrogate(model).save_pretrained(folder / "surrogate")
    documents = [{"id": f"c{i}", "input_ids": ids} for i, ids in enumerate(random_documents([120, 90, 100, 70], 11))]
    (folder / "calibration.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    return folder, documents


SETTINGS = {
    "kvzap": ["--sliding-window", "8"],
    "kvzap_no_sink": ["--sliding-window", "8"],
    "h2o": ["--local-window", "8", "--sinks", "2"],
}


def engine(folder, method):
    extra = ["--kvzap-surrogate", str(folder / "surrogate")] if method.startswith("kvzap") else []
    return ["--model", str(folder / "model"), "--data", str(folder / "calibration.jsonl"), "--method", method,
            "--chunk-size", "8", "--max-length", "256", "--batch-size", "3", *SETTINGS[method], *extra]  # fmt: skip


@pytest.mark.parametrize("method", ["kvzap", "kvzap_no_sink", "h2o"])
def test_calibration_reaches_each_target_within_tolerance(model, calibration_inputs, method):
    """The threshold found, evaluated independently (stream_nll on the same documents), gives the
    density the calibration reports, within the tolerance of the target."""
    folder, documents = calibration_inputs
    probe = folder / f"{method}_probe.json"
    kvsweep("calibrate", *["probe", *engine(folder, method), "--output", str(probe)])
    assert json.loads(probe.read_text())["documents"] == ["c0", "c1", "c2", "c3"]
    for target in (0.2, 0.5, 0.8):
        output = folder / f"{method}_{target}.json"
        kvsweep("calibrate", *["search", *engine(folder, method), "--probe", str(probe), "--target-density", str(target),
                        "--output", str(output)])  # fmt: skip
        record = json.loads(output.read_text())
        assert abs(record["density"] - target) <= 0.01 and len(record["steps"]) <= 10
        assert record["documents"] == ["c0", "c1", "c2", "c3"] and record["target_density"] == target

        spec = get_method(method)
        given = {"kvzap_surrogate": str(folder / "surrogate")} if method.startswith("kvzap") else {}
        given.update(
            {
                k.lstrip("-").replace("-", "_"): int(v)
                for k, v in zip(SETTINGS[method][::2], SETTINGS[method][1::2], strict=True)
            }
        )
        threshold = float(record["threshold"])
        press = build_press(spec, threshold, spec.resolve(threshold, given))
        results = stream_nll(model, [d["input_ids"] for d in documents], 8, press)
        density = sum(r["kv_kept_compressible"] for r in results) / sum(r["kv_total_compressible"] for r in results)
        assert density == pytest.approx(record["density"], abs=1e-12)


def test_an_unreachable_target_is_one_message(calibration_inputs, capsys):
    folder, _ = calibration_inputs
    probe = folder / "h2o_probe_unreachable.json"
    kvsweep("calibrate", *["probe", *engine(folder, "h2o"), "--output", str(probe)])
    with pytest.raises(SystemExit):
        kvsweep("calibrate", *["search", *engine(folder, "h2o"), "--probe", str(probe), "--target-density", "0.43217",
                        "--tolerance", "0.000001", "--output", str(folder / "never.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert "kvsweep calibrate: error: target density 0.43217 cannot be reached within 1e-06" in err
    assert "Closest: threshold" in err and "Traceback" not in err
    assert not (folder / "never.json").exists()


def test_calibration_documents_follow_the_studys_and_never_overlap(tmp_path):
    from kvsweep.demo.model import build_tokenizer

    words = "GAO reviewed the agency program and found gaps in its data".split()
    build_tokenizer([" ".join(words)]).save_pretrained(tmp_path / "tok")
    # Every text distinct (a calibration document may not repeat a study document): (i % 8, i // 8)
    # picks a length and a rotation of the words; i % 4 == 3 is too short to qualify.
    rows = [
        {"id": f"r{i}", "report": " ".join((words[i // 8 :] + words[: i // 8])[: 3 + i % 8] * (1 if i % 4 == 3 else 4))}
        for i in range(30)
    ]
    (tmp_path / "src.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--source", str(tmp_path / "src.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--id-field", "id",
              "--max-length", "64", "--min-length", "12", "--tasks", "perplexity"]  # fmt: skip
    kvsweep(
        "prepare", *[*common, "--max-documents", "10", "--shard-size", "5", "--output-dir", str(tmp_path / "study")]
    )
    kvsweep("prepare", *[*common, "--max-documents", "6", "--shard-size", "6", "--skip-documents", "10",
                  "--output-dir", str(tmp_path / "calibration")])  # fmt: skip

    def ids(folder):
        return [json.loads(line)["id"] for line in (folder / "perplexity" / "documents.jsonl").open()]

    study, calibration = ids(tmp_path / "study"), ids(tmp_path / "calibration")
    assert len(study) == 10 and len(calibration) == 6 and not set(study) & set(calibration)
    qualifying = [r["id"] for r in rows if r["id"] not in {"r3", "r7", "r11", "r15", "r19", "r23", "r27"}]
    assert study + calibration == qualifying[:16]  # the next qualifying ones, in source order
