"""kvpress imported press by press (`kvsweep.engine.upstream`): a job's engine imports neither
kvpress's pipeline nor `datasets`, kvpress's attention patch is applied once, before kvsweep's own
attention is registered, and code that asks kvpress's package for anything gets it whole."""

import subprocess
import sys

CHECK = """
import sys, time
start = time.time()
import kvsweep.engine.methods
from kvsweep.engine.models import load_model
seconds = time.time() - start
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

def patched(fn):
    return fn.__qualname__.startswith("attention_patch")

sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
print("lean", "datasets" not in sys.modules and "kvpress.pipeline" not in sys.modules)
print("patched once", patched(sdpa) and not patched(sdpa.__closure__[0].cell_contents))
print("ours unpatched", not patched(ALL_ATTENTION_FUNCTIONS["kvsweep_evicting_attention"]))
from kvpress import KnormPress, KVPressTextGenerationPipeline
from kvpress.presses.knorm_press import KnormPress as direct
print("whole", KnormPress is direct and "kvpress.pipeline" in sys.modules)
print("still once", ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa)
print("seconds", seconds)
"""


def test_the_engine_imports_kvpress_press_by_press_and_the_package_whole_on_demand():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    lines = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
    assert {key: lines[key] for key in lines if key != "seconds"} == {
        "lean": "True", "patched once": "True", "ours unpatched": "True", "whole": "True", "still once": "True",
    }  # fmt: skip
    print(f"engine imports: {float(lines['seconds']):.2f} s")
