"""gunicorn settings for `make serve`, taken from config.toml (PORT overrides the port)."""

import os

from indexer.config import load_settings

_settings = load_settings()
bind = f"{_settings.host}:{os.environ.get('PORT') or _settings.port}"
workers = _settings.workers
threads = _settings.server_threads
# The first request of a worker may wait for the model to load.
timeout = 120
accesslog = "-"
