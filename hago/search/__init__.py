"""The search engine: the fastest strategy that meets an accuracy target, measured on the target.

Modules, one job each: ``space`` (knobs from the spec), ``target`` (the
accuracy target and metric), ``measure`` (latency on a device, in a child
process or over RPC, with time-outs), ``log`` (append-only JSONL, resumable),
``costmodel`` (xgboost on measured candidates), ``algorithms`` (greedy HAGO,
latency-aware, cost-model-guided evolution), ``engine`` (evaluates candidates
and keeps the front), ``pareto`` (front, table and plot).
"""
