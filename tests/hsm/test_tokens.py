"""JWTs signed in SoftHSM2 through PyJWT, and checked offline from the JWKS."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from hsm.errors import InvalidToken
from hsm.keyring import KeyPurpose, Keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import Pkcs11Token
from hsm.tokens import TokenSigner

ISSUER = "https://tapsign.test"


@pytest.fixture
def keyring(token: Pkcs11Token) -> Keyring:
    keyring = Keyring(Pkcs11KeyStore(token))
    keyring.ensure()
    return keyring


@pytest.fixture
def consent(keyring: Keyring) -> TokenSigner:
    return TokenSigner(keyring, KeyPurpose.CONSENT, issuer=ISSUER)


def claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "user-1", "aud": "bank", "iat": now, "exp": now + 300, **extra}


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_round_trip_with_kid_and_raw_es256_signature(
    consent: TokenSigner, keyring: Keyring
) -> None:
    token = consent.encode(claims(consent="I agree"), token_type="consent+jwt")
    header = jwt.get_unverified_header(token)
    assert header == {
        "alg": "ES256",
        "kid": keyring.active(KeyPurpose.CONSENT).kid,
        "typ": "consent+jwt",
    }
    signature = base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "==")
    assert len(signature) == 64  # JWS ES256 is r || s (RFC 7518 §3.4), straight from C_Sign
    decoded = consent.decode(token, audience="bank")
    assert decoded["consent"] == "I agree"
    assert decoded["iss"] == ISSUER


def test_anyone_verifies_from_the_published_jwks(consent: TokenSigner, keyring: Keyring) -> None:
    token = consent.encode(claims())
    jwk_set = jwt.PyJWKSet.from_dict(keyring.jwks())
    key = jwk_set[jwt.get_unverified_header(token)["kid"]]
    decoded = jwt.decode(token, key=key, algorithms=["ES256"], audience="bank", issuer=ISSUER)
    assert decoded["sub"] == "user-1"


def test_old_tokens_verify_after_rotation_until_the_key_is_retired(
    consent: TokenSigner, keyring: Keyring
) -> None:
    old_kid = keyring.active(KeyPurpose.CONSENT).kid
    before = consent.encode(claims())
    keyring.rotate(KeyPurpose.CONSENT)
    after = consent.encode(claims())
    assert jwt.get_unverified_header(after)["kid"] != old_kid
    assert consent.decode(before, audience="bank")["sub"] == "user-1"
    keyring.retire(old_kid)
    with pytest.raises(InvalidToken, match=r"^the token is not valid$") as raised:
        consent.decode(before, audience="bank")
    assert raised.value.reason == "unknown kid"
    assert consent.decode(after, audience="bank")["sub"] == "user-1"


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        pytest.param(
            lambda token, _: (
                token.split(".")[0] + "." + b64(claims(sub="user-2")) + "." + token.split(".")[2]
            ),
            "InvalidSignatureError",
            id="payload changed after signing",
        ),
        pytest.param(
            lambda token, _: token[:-6], "InvalidSignatureError", id="truncated signature"
        ),
        pytest.param(
            lambda token, _: (
                b64({"alg": "none", "typ": "JWT", "kid": "x"}) + "." + token.split(".")[1] + "."
            ),
            "unknown kid",
            id="alg none",
        ),
        pytest.param(
            lambda token, kid: (
                b64({"alg": "none", "typ": "JWT", "kid": kid}) + "." + token.split(".")[1] + "."
            ),
            "InvalidAlgorithmError",
            id="alg none with a real kid",
        ),
        pytest.param(
            lambda token, kid: (
                b64({"alg": "HS256", "typ": "JWT", "kid": kid})
                + "."
                + token.split(".")[1]
                + "."
                + token.split(".")[2]
            ),
            "InvalidAlgorithmError",
            id="alg HS256 with a real kid",
        ),
        pytest.param(lambda token, _: "not.a.jwt", "DecodeError", id="garbage"),
    ],
)
def test_tampered_tokens_are_refused(
    consent: TokenSigner, keyring: Keyring, mangle: object, reason: str
) -> None:
    kid = keyring.active(KeyPurpose.CONSENT).kid
    token = mangle(consent.encode(claims()), kid)  # type: ignore[operator]
    with pytest.raises(InvalidToken, match=r"^the token is not valid$") as raised:
        consent.decode(token, audience="bank")
    assert raised.value.reason.startswith(reason)


def test_expired_wrong_audience_and_missing_claims(consent: TokenSigner) -> None:
    now = int(time.time())
    expired = consent.encode(claims(iat=now - 600, exp=now - 300))
    with pytest.raises(InvalidToken) as raised:
        consent.decode(expired, audience="bank")
    assert raised.value.reason.startswith("ExpiredSignatureError")

    with pytest.raises(InvalidToken) as raised:
        consent.decode(consent.encode(claims()), audience="another bank")
    assert raised.value.reason.startswith("InvalidAudienceError")

    with pytest.raises(InvalidToken) as raised:
        consent.decode(consent.encode({"sub": "x", "iat": now}))
    assert raised.value.reason.startswith("MissingRequiredClaimError")


def test_a_key_of_another_purpose_does_not_validate(keyring: Keyring) -> None:
    signed_by_token_key = TokenSigner(keyring, KeyPurpose.TOKEN, issuer=ISSUER).encode(claims())
    with pytest.raises(InvalidToken) as raised:
        TokenSigner(keyring, KeyPurpose.CONSENT, issuer=ISSUER).decode(
            signed_by_token_key, audience="bank"
        )
    assert raised.value.reason.endswith("belongs to token-signing")


def test_wrong_issuer(keyring: Keyring) -> None:
    token = TokenSigner(keyring, KeyPurpose.TOKEN, issuer="https://evil.test").encode(claims())
    with pytest.raises(InvalidToken) as raised:
        TokenSigner(keyring, KeyPurpose.TOKEN, issuer=ISSUER).decode(token, audience="bank")
    assert raised.value.reason.startswith("InvalidIssuerError")
