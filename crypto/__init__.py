"""Share-of-Model cryptography: a pure library (no DB, no network, no ``marketplace``).

Safe recipes live at the top level; raw TenSEAL calls and tunables live in ``crypto.hazmat``.
"""
