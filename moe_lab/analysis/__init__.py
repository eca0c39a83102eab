"""Analysis: reading run and sweep directories back (`runs.py`), routing statistics (`stats.py`), and the HTML
dashboards (`figures.py`, `pages.py`, `templates/`). NumPy, plotly and Jinja2 only: never torch."""
