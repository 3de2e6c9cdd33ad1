"""The web UI's static files (``static/``: HTML, CSS, ES modules), served at ``/ui/`` by
:mod:`marketplace.api.routes_web`. No Python here: the UI is a client of the ``/v1`` API."""
