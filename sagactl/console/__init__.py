"""`saga console`: the running system in the browser (Flask + Jinja2, htmx, Mermaid, uPlot).

Everything it shows comes from sagactl.inspect, the module the CLI prints from: the console
renders those dicts, it computes nothing of its own about lag, pending entries, owners,
outboxes, dead letters or traces. Only an operator sees it: login.py guards every page with a
session that auth.py starts from an admin JWT, verified as the REST APIs verify bearer tokens.
"""
