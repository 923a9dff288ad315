"""The evaluation wing: ``rayseg evaluate`` and what it writes.

- :mod:`.evaluate`: ``run_evaluate(cfg)`` scores predictions against truth masks (per-image
  counts, every reduction, bootstrap intervals).
- :mod:`.report`: ``report.json`` and ``report.md``; :mod:`.report_html`: ``report.html``, the
  same report with its charts and images embedded.
- :mod:`.overlays`: image | truth | prediction | errors PNGs.
- :mod:`.plots`: learning curves and other charts.
"""
