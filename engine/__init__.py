"""The tapsign domain: users, devices, operations and their state machines.

Importing this package imports nothing else, so that every other package may
depend on :mod:`engine.errors` without pulling in the domain.
"""
