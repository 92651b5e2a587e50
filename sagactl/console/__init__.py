"""`saga console`: the running system in the browser (Flask + Jinja2, htmx, Mermaid, uPlot).

Everything it shows comes from sagactl.inspect, the module the CLI prints from: the console
renders those dicts, it computes nothing of its own about lag, pending entries, owners,
outboxes, dead letters or traces.
"""
