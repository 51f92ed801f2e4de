"""What the jobs wrote, turned into answers: results read back and checked, bootstrap intervals,
the calibration search, method against method, job costs, figures."""
