"""Reference clients of tapsign: the device side and the relying-party side."""
