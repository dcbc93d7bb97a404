"""The tapsign protocol and its reference clients.

* :mod:`tapsign_sdk.wire` -- the JSON bodies of the HTTP API (msgspec types);
* :mod:`tapsign_sdk.payload` -- the bytes a phone signs to answer an operation;
* :mod:`tapsign_sdk.request` -- the canonical form of a signed device request;
* :mod:`tapsign_sdk.model` -- kinds, decisions, user verification, attestations, limits;
* :mod:`tapsign_sdk.problems` -- the problem types (RFC 9457) errors are reported as;
* :mod:`tapsign_sdk.client` and :mod:`tapsign_sdk.device` -- a relying party's backend and
  a phone.

The server imports the protocol from here; nothing here imports the server.
"""
