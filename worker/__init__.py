"""The accumsync process and its adapters (the tree is the map; README.md, "Where things live").

Nothing is imported here: ``import worker.vba`` (or the sandbox, or the CLI) starts no Celery
app, reads no settings and creates no directory. ``celery -A worker`` finds the app in
``worker/celery.py`` by itself.
"""
