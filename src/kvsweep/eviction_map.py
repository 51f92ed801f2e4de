"""Where eviction happens: for one document, per layer, the fraction of KV heads keeping each position.

    python -m kvsweep.eviction_map [engine arguments as for kvsweep.evaluate] [--calibration T.json]
        --output-png F.png --output-pdf F.pdf

Runs the method on the first document of the shard and draws one row per layer (dark: evicted by
every KV head, light: kept by all), with the sinks and the final protected window marked.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kvsweep.compare import save_figure
from kvsweep.errors import KvsweepError, readable_errors
from kvsweep.evaluate import add_engine_arguments, cuda_graphs_setting, load_shard, resolve_method
from kvsweep.stages import start_job


def plot_eviction_map(evicted, title: str, sinks: int, window: int):
    """evicted: bool array (layers, KV heads, positions)."""
    kept_fraction = 1.0 - evicted.mean(axis=1)
    n_layers, n_positions = kept_fraction.shape
    fig, axis = plt.subplots(figsize=(12, 1.2 + 0.25 * n_layers), constrained_layout=True)
    image = axis.imshow(kept_fraction, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    if sinks:
        axis.axvline(sinks - 0.5, color="red", linewidth=1, label=f"sinks ({sinks})")
    if window:
        axis.axvline(n_positions - window - 0.5, color="white", linestyle="--", linewidth=1, label=f"window ({window})")
    axis.set(xlabel="position in the document", ylabel="layer", title=title)
    if sinks or window:
        axis.legend(loc="upper left", fontsize=7)
    fig.colorbar(image, ax=axis, label="share of KV heads keeping")
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvsweep.eviction_map", description=__doc__.split("\n\n")[0])
    add_engine_arguments(parser)
    parser.add_argument(
        "--calibration", help="take the threshold a calibration found (its JSON) instead of --threshold"
    )
    parser.add_argument("--output-png", required=True)
    parser.add_argument("--output-pdf", required=True)
    args = parser.parse_args(argv)
    with readable_errors("kvsweep.eviction_map"):
        if args.calibration:
            args.threshold = float(json.loads(Path(args.calibration).read_text())["threshold"])
        method, settings = resolve_method(args)
        documents = load_shard(args.data, args.max_length)
        if not documents:
            raise KvsweepError(f"{args.data}: no document to draw")
        from kvsweep.job_gpus import job_gpus
        from kvsweep.modeling import load_model
        from kvsweep.stream_nll import stream_nll

        model = load_model(args.model, args.dtype, args.device, gpus=job_gpus(args.device, args.gpus))
        press = method.build(args.threshold, settings)
        doc = documents[0]
        result = stream_nll(
            model,
            [doc["input_ids"]],
            args.chunk_size,
            press,
            return_evicted=True,
            cuda_graphs=cuda_graphs_setting(args),
        )[0]
        density = result["kv_kept"] / result["kv_total"]
        swept = (
            f"threshold {args.threshold:g}" if method.takes_threshold else f"{method.sweep} {settings[method.sweep]}"
        )
        title = f"{args.method} at {swept}: document {doc['id']}, KV density {density:.2f}"
        fig = plot_eviction_map(result["evicted"], title, settings.get("sinks", 0), method.window(settings))
        save_figure(fig, args.output_png, args.output_pdf)


if __name__ == "__main__":
    start_job("kvsweep.eviction_map")
    main()
