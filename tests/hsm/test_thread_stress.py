"""Many threads signing and verifying on one SoftHSM2 token at once, every result checked.

python-pkcs11 releases the GIL in every C_* call, so these threads really are inside
SoftHSM2 at the same time. The session pool is smaller than the number of threads, so
threads also queue for sessions. (Checklist item 21: HSM access is concurrency-safe.)
"""

from __future__ import annotations

import random
import threading

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsm.keyring import KeyPurpose, Keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.verify_backends import Pkcs11VerifyBackend, VerifyItem
from tests.conftest import TokenFactory

THREADS = 12
ROUNDS = 150
DEVICE_KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(24)]


def device_item(index: int, valid: bool) -> VerifyItem:
    key = DEVICE_KEYS[index % len(DEVICE_KEYS)]
    message = b"operation %d" % index
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point, message if valid else message + b"!", signature


def test_sign_and_verify_from_many_threads(new_token: TokenFactory) -> None:
    token = new_token(max_sessions=4)
    keyring = Keyring(Pkcs11KeyStore(token))
    keyring.ensure()
    public_keys = {
        key.kid: key.public_key for key in keyring.published() if key.public_key is not None
    }
    signing = [purpose for purpose in KeyPurpose if purpose.kind == "signing"]
    backend = Pkcs11VerifyBackend(token, key_cache=8)  # smaller than the key set: evictions too
    workload = [(device_item(index, index % 4 != 3), index % 4 != 3) for index in range(96)]
    failures: list[str] = []
    checked = [0]
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def hammer(seed: int) -> None:
        chooser = random.Random(seed)
        start.wait()
        done = 0
        for round_number in range(ROUNDS):
            if chooser.random() < 0.5:
                purpose = chooser.choice(signing)
                kid = keyring.active(purpose).kid
                message = b"thread %d round %d" % (seed, round_number)
                raw = keyring.sign(kid, message)
                der = encode_dss_signature(
                    int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
                )
                try:
                    public_keys[kid].verify(der, message, ec.ECDSA(hashes.SHA256()))
                except Exception:
                    failures.append(f"bad signature from {purpose} in thread {seed}")
                done += 1
            else:
                batch = chooser.sample(workload, chooser.randint(1, 12))
                outcomes = backend.verify_batch([item for item, _ in batch])
                expected = [valid for _, valid in batch]
                if outcomes != expected:
                    failures.append(f"verify mismatch in thread {seed}: {outcomes} != {expected}")
                done += len(batch)
        with lock:
            checked[0] += done

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert checked[0] >= THREADS * ROUNDS
