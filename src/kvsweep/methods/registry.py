"""Name -> method. One entry per method file."""

from kvsweep.methods.baseline import BASELINE
from kvsweep.methods.h2o import H2O
from kvsweep.methods.kvzap import KVZAP, KVZAP_NO_SINK

METHODS = {method.name: method for method in (BASELINE, KVZAP, KVZAP_NO_SINK, H2O)}
