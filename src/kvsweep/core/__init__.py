"""What every layer uses and nothing in it needs torch: errors, files, thresholds, settings,
timing of jobs, provenance of results, and the job process's lifecycle."""
