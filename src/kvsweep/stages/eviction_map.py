"""Where eviction happens: for one document, per layer, the share of KV heads keeping each
position (`kvsweep.analysis.figures.plot_eviction_map`).

Runs the method on the first document of the shard and draws one row per layer (dark: evicted by
every KV head, light: kept by all), with the sinks and the final protected window marked.
"""

from dataclasses import dataclass, replace

from kvsweep.analysis.figures import plot_eviction_map, save_figure
from kvsweep.analysis.results import read_calibrations
from kvsweep.core.errors import KvsweepError
from kvsweep.core.timing import StageClock
from kvsweep.stages.model_jobs import EngineOptions, build_press, load_engine_model, load_shard, resolve_method


@dataclass
class EvictionMapOptions(EngineOptions):
    output_png: str = ""
    output_pdf: str = ""
    calibration: str | None = None  # take the threshold a calibration found (its record) instead of `threshold`


def run(options: EvictionMapOptions, clock: StageClock | None = None) -> None:
    clock = clock or StageClock()
    if options.calibration:
        options = replace(options, threshold=float(read_calibrations([options.calibration])[0]["threshold"]))
    method, settings = resolve_method(options)
    documents = load_shard(options.data, options.max_length)
    if not documents:
        raise KvsweepError(f"{options.data}: no document to draw")
    model = load_engine_model(options, clock)
    press = build_press(method, options.threshold, settings, model, clock)
    from kvsweep.engine.stream_nll import stream_nll

    doc = documents[0]
    result = stream_nll(
        model, [doc["input_ids"]], options.chunk_size, press, return_evicted=True, cuda_graphs=options.graphs
    )[0]
    density = result["kv_kept"] / result["kv_total"]
    swept = f"threshold {options.threshold:g}" if method.takes_threshold else f"{method.sweep} {settings[method.sweep]}"
    title = f"{options.method} at {swept}: document {doc['id']}, KV density {density:.2f}"
    fig = plot_eviction_map(result["evicted"], title, settings.get("sinks", 0), method.window(settings))
    save_figure(fig, options.output_png, options.output_pdf)
