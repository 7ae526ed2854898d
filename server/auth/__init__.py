"""Who may call which route: scoped API keys, per-key limits, and the middleware enforcing both.

Layout: scopes.py (the scope names and the route -> scope declaration), keys.py (a key record,
token format and hashing), store.py (the key file: atomic writes, reload on change),
middleware.py (authentication and scope checks), limits.py (requests, tokens, streams per key),
cli.py (`medserve keys ...`).
"""
