"""What a study is, before anything runs: its config (validated against the schema), how its
documents are sharded, and the methods and tasks it may name. No torch: the workflow plans with it."""
