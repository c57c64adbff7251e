"""effx.check: what runs artifacts against the PyTorch reference and says how they did.

validate (numerics, first diverging block, latency and memory), report (report.json / .md / plots), bench
(latency and memory sweeps), reference (the PyTorch runner), measure (timing and memory helpers), tables
(rich tables for the CLI).
"""
