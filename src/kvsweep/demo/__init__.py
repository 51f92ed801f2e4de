"""The CPU demo's assets (nothing downloaded): generated GovReport-like reports (`reports`) and a tiny
Llama that copies facts from far back, summarizes and stops, and repeats a document (`model`,
bundled; `kvsweep.stages.demo_assets` copies it beside the reports)."""

from importlib.resources import files

# The bundled model and its tokenizer (`kvsweep.demo.model` says how it was made).
BUNDLED_MODEL = files("kvsweep.demo") / "model"
