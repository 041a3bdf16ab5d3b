"""Serving every budget of an elastic checkpoint from one copy of the weights (issue 5): budget views,
generation at a budget and elastic budget control (engine.py), an OpenAI-compatible server (app.py)."""

from .views import budget_view

__all__ = ["budget_view"]
