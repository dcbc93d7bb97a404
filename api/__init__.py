"""The outer layer of tapsign: the command line now, the HTTP API later."""
