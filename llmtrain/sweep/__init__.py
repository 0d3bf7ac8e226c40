"""Sweeps: per-job status records (job.py), the end-of-sweep summary table (summary.py) and the
Hydra callback that ties them to `llmtrain <stage> -m ...` (callback.py)."""
