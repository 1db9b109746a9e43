"""ModelApp serving: a Flask app that downloads a pinned model, verifies it and serves predictions."""

__version__ = "0.1.0"
