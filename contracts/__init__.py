"""Share-of-Model contracts: terms, signed offers and acceptances, policy and metering.

A pure library: it may use ``crypto`` but never ``marketplace``, a DB or the network.
"""
