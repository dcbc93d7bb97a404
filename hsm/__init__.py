"""tapsign's keys over PKCS#11 (or, explicitly chosen, encrypted files), JWT signing and
the batched signature verifier."""
