"""A KVzap surrogate for any model: KVzip+ targets from the model itself, and the fit."""
