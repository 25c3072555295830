"""Evaluation: perplexity on held-out code, HumanEval pass@k in a sandbox, reports.

Modules: `perplexity` (Ray Data job over the training chunking), `generation` (samples from a
checkpoint on Ray actors, or from a running `/v1/completions` endpoint), `sandbox` (runs
untrusted code in a limited child process), `humaneval` (problems, stop strings, scoring),
`passk` (the unbiased estimator), `report` (JSON + Markdown + loss curve).
"""
