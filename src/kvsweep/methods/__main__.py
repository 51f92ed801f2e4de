"""`python -m kvsweep.methods`: the table of methods and their settings (as in the README)."""

from kvsweep.methods import method_table

print(method_table())
