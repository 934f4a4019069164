"""The operator dashboard: server-rendered HTML (Jinja2) over the server's domain services."""
