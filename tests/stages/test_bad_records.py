"""Records and arguments that once passed silently or ended in a traceback: each is now refused
with one message naming what is wrong (or, where nothing is wrong, accepted)."""

import json

import pytest
from test_refused_inputs import calibrate_args, one_line_error

from kvsweep.analysis.results import load_results, read_calibrations
from kvsweep.core.errors import KvsweepError
from kvsweep.core.io import atomic_path, record_digests
from kvsweep.demo import BUNDLED_MODEL
from kvsweep.engine.models import load_model, load_tokenizer
from kvsweep.stages.model_jobs import EngineOptions
from kvsweep.stages.prepare import PrepareOptions, run

from conftest import kvsweep

REPORT = "The agency reviewed the program and found that its budget of 20 million was spent. " * 3


def source(tmp_path, records, name="reports.jsonl", prefix=b"") -> str:
    path = tmp_path / name
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in records).encode())
    return str(path)


def prepare(tmp_path, path, **options):
    settings = {"max_documents": 2, "max_length": 64, "shard_size": 2, "id_field": "id", "min_length": 2}
    return run(PrepareOptions(source=path, tokenizer=str(BUNDLED_MODEL), output_dir=str(tmp_path / "out"),
                              **{**settings, **options}))  # fmt: skip


def reports(n, **fields):
    return [
        {"id": f"r{i}", "report": f"{REPORT} Report number {i}.", "summary": "A summary.", **fields} for i in range(n)
    ]


def test_an_id_shared_by_a_study_document_and_a_later_one_is_refused(tmp_path):
    """The calibration (or a surrogate's training) reads past the study's documents: a record
    after them with a study document's id is refused, naming both records."""
    records = reports(4)
    records[3]["id"] = "r1"
    path = source(tmp_path, records)
    with pytest.raises(KvsweepError, match="records 1 and 3: both have the id 'r1'"):
        prepare(tmp_path, path, skip_documents=2)


def test_a_later_document_that_repeats_a_study_documents_text_is_refused(tmp_path):
    records = reports(4)
    records[3]["report"] = records[0]["report"]
    path = source(tmp_path, records)
    with pytest.raises(KvsweepError, match=r"record 3 \('r3'\) has the text of record 0"):
        prepare(tmp_path, path, skip_documents=2)
    assert prepare(tmp_path, path, max_documents=4, shard_size=4)["kept"] == 4  # within the study: said, not refused


@pytest.mark.parametrize("value", [{"x": 1}, None, "", True, [1]])
def test_an_id_that_is_not_a_text_or_an_integer_is_refused(tmp_path, value):
    records = reports(2)
    records[1]["id"] = value
    with pytest.raises(
        KvsweepError, match=r"record 1: the id field 'id' holds .*an id is a non-empty text or an integer"
    ):
        prepare(tmp_path, source(tmp_path, records))


def test_integer_ids_are_taken(tmp_path):
    records = reports(2)
    records[0]["id"], records[1]["id"] = 7, 8
    prepare(tmp_path, source(tmp_path, records))
    listed = [json.loads(line)["id"] for line in (tmp_path / "out" / "perplexity" / "documents.jsonl").open()]
    assert listed == ["7", "8"]


@pytest.mark.parametrize("summary", [7, {"text": "x"}, [], ["ok", 3]])
def test_a_reference_summary_that_is_not_text_is_refused(tmp_path, summary):
    records = reports(2)
    records[1]["summary"] = summary
    with pytest.raises(KvsweepError, match="record 1: no reference summary in field 'summary' \\(a text or a list"):
        prepare(tmp_path, source(tmp_path, records), tasks=["summarization"])


def test_a_byte_order_mark_is_read_and_lines_after_the_study_are_not(tmp_path):
    path = tmp_path / "reports.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in reports(2)).encode() + b"{not json\n")
    assert prepare(tmp_path, str(path))["kept"] == 2
    with pytest.raises(KvsweepError, match="line 3: not valid JSON"):
        prepare(tmp_path, str(path), max_documents=3, shard_size=3)


def test_whitespace_around_records_changes_no_digest_and_an_edit_does(tmp_path):
    records = reports(3)
    plain = list(record_digests(source(tmp_path, records, "a.jsonl")))
    spaced = tmp_path / "b.jsonl"
    spaced.write_bytes(b"\xef\xbb\xbf" + b"".join(b"  " + json.dumps(r).encode() + b" \r\n" for r in records))
    assert list(record_digests(spaced)) == plain
    records[1]["report"] += "!"
    edited = list(record_digests(source(tmp_path, records, "c.jsonl")))
    assert edited[0] == plain[0] and edited[1] != plain[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--id-field", ""], "--id-field is empty"),
        (["--skip-documents", "-5"], "argument --skip-documents: must be >= 0, got -5"),
        (["--max-length", "1"], "argument --max-length: must be >= 2, got 1"),
        (["--min-length", "1"], "argument --min-length: must be >= 2, got 1"),
    ],
)
def test_prepare_refuses_arguments_out_of_range(tmp_path, capsys, args, message):
    path = source(tmp_path, reports(2))
    base = {"--source": path, "--tokenizer": str(BUNDLED_MODEL), "--max-documents": "2", "--max-length": "64",
            "--shard-size": "2", "--output-dir": str(tmp_path / "out")}  # fmt: skip
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    with pytest.raises(SystemExit) as stopped:
        kvsweep("prepare", *argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_folder_without_a_model_or_tokenizer_is_one_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvsweepError, match="tokenizer '.*empty': the folder holds no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(KvsweepError, match="model '.*empty': the folder holds no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "tokenizer_config.json").write_text("{}")  # a tokenizer that cannot be built
    with pytest.raises(KvsweepError, match="tokenizer '.*empty' could not be loaded as a local folder"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_chunk_beyond_the_longest_document_computes_what_max_length_does():
    options = EngineOptions(model="m", data="d", method="baseline", chunk_size=10**9, max_length=64)
    assert options.chunk_size == 64
    assert EngineOptions(model="m", data="d", method="baseline", chunk_size=16, max_length=64).chunk_size == 16


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-steps", "0"], "argument --max-steps: must be from 2 to 50, got 0"),
        (["--tolerance", "-1"], "argument --tolerance: must lie in (0, 0.2], got -1"),
        (["--target-density", "nan"], "argument --target-density: must lie in (0, 1), got nan"),
    ],
)
def test_calibration_search_refuses_arguments_out_of_range(model_dir, tmp_path, capsys, args, message):
    argv = calibrate_args(model_dir, tmp_path, "search", "h2o", "--probe", "p.json", "--target-density", "0.5", *args)
    with pytest.raises(SystemExit):
        kvsweep("calibrate", *argv)
    assert message in capsys.readouterr().err


def test_a_probe_of_another_method_is_refused(model_dir, tmp_path, capsys):
    kvsweep("calibrate", *calibrate_args(model_dir, tmp_path, "probe", "random", "--sliding-window", "4"))
    probe = tmp_path / "probe.json"
    (tmp_path / "out.json").rename(probe)
    args = calibrate_args(model_dir, tmp_path, "search", "h2o", "--probe", str(probe), "--target-density", "0.3",
                          "--local-window", "4")  # fmt: skip
    err = one_line_error(capsys, "kvsweep calibrate", lambda: kvsweep("calibrate", *args))
    assert "was made with method 'random', this search has 'h2o'" in err


def test_results_and_calibrations_with_values_that_are_not_numbers_are_refused(tmp_path):
    path = tmp_path / "perplexity" / "h2o" / "notanumber" / "shard000.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(KvsweepError, match="'notanumber' is no swept value"):
        load_results([str(path)])
    record = tmp_path / "calibration" / "h2o" / "0.5.json"
    record.parent.mkdir(parents=True)
    for content, message in [({"target_density": "abc", "threshold": "0.005"}, "target_density 'abc' is not a density"),
                             ({"target_density": 0.5, "threshold": "x"}, "threshold 'x' is not a threshold")]:  # fmt: skip
        record.write_text(json.dumps(content))
        with pytest.raises(KvsweepError, match=message):
            read_calibrations([record])


def test_an_output_that_is_a_folder_is_one_message(tmp_path):
    with pytest.raises(KvsweepError, match="it is a folder"):
        with atomic_path(tmp_path):
            pass
    assert not list(tmp_path.iterdir())  # no temporary file left beside it


@pytest.mark.parametrize("content", [None, "a,b\n1,2\n"])
def test_figures_of_a_missing_or_foreign_table_are_one_message(tmp_path, capsys, content):
    summary = tmp_path / "summary.csv"
    if content is not None:
        summary.write_text(content)
    args = ["--summary", summary, "--task", "perplexity", "--output-png", tmp_path / "f.png", "--output-pdf",
            tmp_path / "f.pdf"]  # fmt: skip
    err = one_line_error(capsys, "kvsweep figures", lambda: kvsweep("figures", *args))
    assert ("no such file" if content is None else "not a perplexity summary.csv (no column") in err


@pytest.mark.parametrize(
    "command,args,message",
    [
        ("evaluate", ["--gpus", "-1"], "argument --gpus: must be >= 0, got -1"),
        ("score", ["--confidence", "nan"], "argument --confidence: must lie in (0, 1), got nan"),
        ("comparison", ["--grid", "1.5"], "argument --grid: must lie in (0, 1), got 1.5"),
        ("comparison", ["--tolerance", "5"], "argument --tolerance: must lie in (0, 0.2], got 5"),
    ],
)
def test_numbers_out_of_range_are_refused_by_every_command(capsys, command, args, message):
    with pytest.raises(SystemExit) as stopped:
        kvsweep(command, *args)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
