"""One PKCS#11 token, shared safely by many threads. The only module that wraps python-pkcs11.

Theory of operation
-------------------
*Locking.* PKCS#11 v2.40 §5.4: a library initialised by ``C_Initialize(NULL)`` may assume
that its caller never calls it from two threads at once, and SoftHSM2 then switches its
own mutexes off. python-pkcs11 0.10 initialises with ``NULL`` and releases the GIL in
every ``C_*`` call, so parallel Python threads would run SoftHSM2 unlocked. We therefore
initialise the module ourselves, through its function list, with ``CKF_OS_LOCKING_OK``
(python-pkcs11's ``lib.initialize`` is a ``cpdef`` method, overridden below), once per
process.

*Sessions.* A session carries at most one active operation (§5.6) and python-pkcs11
serialises each session with a lock, so sessions are never shared between threads: every
operation checks a session out of a bounded pool and returns it afterwards. Each pooled
session keeps the handles it found (private keys) and created (public-key session objects
for the verifier), because ``C_FindObjects`` and ``C_CreateObject`` per call cost more
than the signature itself.

*Login.* Login state belongs to the application, not the session (§6.7.4): a second
``C_Login`` fails with ``CKR_USER_ALREADY_LOGGED_IN`` and ``C_Logout`` on any session logs
all of them out. One login session therefore stays open for the life of the token object;
pooled sessions are opened without a PIN and are closed without logging out.

*Errors.* :func:`map_error` turns ``PKCS11Error`` into :mod:`hsm.errors`, here and only
here. :meth:`Pkcs11Token.run` is the one place that recovers from a lost session: it
drops every session of the lost generation, logs in again and retries the operation once.
A key handle that turns invalid counts as a lost session (the token reloaded its objects).
When the token cannot be found again, the module itself is restarted (``C_Finalize``,
``C_Initialize``) once none of our sessions is in use, and until the token is back every
request fails fast with :class:`~hsm.errors.HsmTransientError` (503): service resumes by
itself, without restarting tapsign (tests/e2e/test_faults.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pkcs11
from pkcs11 import _pkcs11, exceptions
from pkcs11.types import DecryptMixin, EncryptMixin, SignMixin, VerifyMixin

from hsm.errors import (
    HsmError,
    HsmPermanentError,
    HsmTransientError,
    KeyNotFound,
    SessionLost,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CK_RV = ctypes.c_ulong
CKF_OS_LOCKING_OK = 0x00000002
CKR_OK = 0x0
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKU_USER = 1
#: ``CK_SESSION_INFO.state`` values of a session whose application is logged in as user.
CKS_USER_STATES = (1, 3)  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS

#: How long a thread waits for a free session before it is told the HSM is busy.
CHECKOUT_TIMEOUT_SECONDS = 5.0
#: Least time between two restarts of the module while the token is lost.
RESTART_INTERVAL_SECONDS = 2.0


class _InitializeArgs(ctypes.Structure):
    """``CK_C_INITIALIZE_ARGS`` (PKCS#11 v2.40 §3.6)."""

    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    )


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _SessionInfo(ctypes.Structure):
    """``CK_SESSION_INFO`` (PKCS#11 v2.40 §3.6)."""

    _fields_ = (
        ("slotID", ctypes.c_ulong),
        ("state", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
        ("ulDeviceError", ctypes.c_ulong),
    )


_C_Initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_C_InitToken = ctypes.CFUNCTYPE(
    CK_RV, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
)
_C_GetSessionInfo = ctypes.CFUNCTYPE(CK_RV, ctypes.c_ulong, ctypes.POINTER(_SessionInfo))
_C_Login = ctypes.CFUNCTYPE(CK_RV, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong)
_C_Logout = ctypes.CFUNCTYPE(CK_RV, ctypes.c_ulong)
_C_Finalize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)


class _FunctionList(ctypes.Structure):
    """The head of ``CK_FUNCTION_LIST`` in the standard's order, up to ``C_Logout``: the calls
    python-pkcs11 does not offer (initialise with locking and finalise, make a token,
    inspect and restore a login without opening a session)."""

    _fields_ = (
        ("version", _Version),
        ("C_Initialize", _C_Initialize),
        ("C_Finalize", _C_Finalize),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", _C_InitToken),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", ctypes.c_void_p),
        ("C_CloseAllSessions", ctypes.c_void_p),
        ("C_GetSessionInfo", _C_GetSessionInfo),
        ("C_GetOperationState", ctypes.c_void_p),
        ("C_SetOperationState", ctypes.c_void_p),
        ("C_Login", _C_Login),
        ("C_Logout", _C_Logout),
    )


def _function_list(path: str) -> _FunctionList:
    # dlopen of the same path returns the handle python-pkcs11 already holds, so these
    # functions act on the same library instance.
    library = ctypes.CDLL(path)
    pointer = ctypes.POINTER(_FunctionList)()
    rv = library.C_GetFunctionList(ctypes.byref(pointer))
    if rv != CKR_OK:
        raise HsmPermanentError(f"C_GetFunctionList of {path} failed (CKR 0x{rv:x})")
    return pointer.contents


class _OsLockingLib(_pkcs11.lib):
    """python-pkcs11's ``lib`` initialised with ``CKF_OS_LOCKING_OK`` instead of ``NULL``."""

    def initialize(self) -> None:
        args = _InitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = _function_list(self.so).C_Initialize(ctypes.byref(args))
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmPermanentError(f"C_Initialize of {self.so} failed (CKR 0x{rv:x})")

    def restart(self) -> None:
        """``C_Finalize`` then ``C_Initialize``: the module forgets every session and reads
        its slots and tokens afresh. Only safe while no other thread is inside the module."""
        _function_list(self.so).C_Finalize(None)
        self.initialize()


_modules: dict[str, _OsLockingLib] = {}
_modules_lock = threading.Lock()


def load_module(path: str, *, softhsm2_conf: str | None = None) -> _OsLockingLib:
    """The process-wide instance of the PKCS#11 module at ``path``, initialised for threads.

    ``softhsm2_conf`` is exported as ``SOFTHSM2_CONF`` unless the environment already names
    one; SoftHSM2 reads it once, in ``C_Initialize``.
    """
    with _modules_lock:
        if path in _modules:
            return _modules[path]
        if not Path(path).is_file():
            raise HsmPermanentError(
                f"no PKCS#11 module at {path}: install SoftHSM2 (make run does) "
                "or set TAPSIGN_HSM_MODULE to your HSM vendor's library"
            )
        if softhsm2_conf is not None and "SOFTHSM2_CONF" not in os.environ:
            os.environ["SOFTHSM2_CONF"] = str(Path(softhsm2_conf).resolve())
        try:
            module = _OsLockingLib(path)
        except exceptions.PKCS11Error as exc:
            raise map_error(exc) from exc
        _modules[path] = module
        # Loaded for the life of the process, never deallocated: at interpreter exit the
        # garbage collector clears this subclass before its instance, whose Cython
        # __dealloc__ then fails to find ``unload`` and prints a traceback per process.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(module))
        log.info("loaded PKCS#11 module %s (%s)", path, module.manufacturer_id)
        return module


# Session or login gone: reconnect and retry. PKCS#11 v2.40 §5.1 return values. A key
# handle that is no longer valid means the token dropped its objects (SoftHSM2 does when
# its token directory goes away and comes back): the sessions' cached handles go too.
_SESSION_LOST = (
    exceptions.ObjectHandleInvalid,
    exceptions.SessionHandleInvalid,
    exceptions.SessionClosed,
    exceptions.DeviceRemoved,
    exceptions.DeviceError,
    exceptions.TokenNotPresent,
    exceptions.TokenNotRecognised,
    exceptions.UserNotLoggedIn,
)
# The login was refused for its PIN: nothing a retry would change.
_PIN_REFUSED = (
    exceptions.PinIncorrect,
    exceptions.PinInvalid,
    exceptions.PinLenRange,
    exceptions.PinLocked,
)
# Busy or short of resources: retry later, nothing to reconnect.
_TRANSIENT = (
    exceptions.DeviceMemory,
    exceptions.HostMemory,
    exceptions.SessionCount,
    exceptions.FunctionCancelled,
)


def map_error(exc: exceptions.PKCS11Error) -> HsmError:
    """The :mod:`hsm.errors` class for a python-pkcs11 error. Messages never carry a PIN."""
    name = type(exc).__name__
    if isinstance(exc, _SESSION_LOST):
        return SessionLost(f"HSM session lost ({name})")
    if isinstance(exc, _TRANSIENT):
        return HsmTransientError(f"HSM temporarily unable to serve ({name})")
    if isinstance(exc, exceptions.NoSuchKey):
        return KeyNotFound("no such key on the HSM token")
    if isinstance(exc, exceptions.NoSuchToken):
        return HsmPermanentError(f"no PKCS#11 token with the configured label ({name})")
    if isinstance(exc, exceptions.PinLocked):
        return HsmPermanentError("HSM login refused: the user PIN is locked")
    if isinstance(exc, _PIN_REFUSED):
        return HsmPermanentError("HSM login refused: the configured PIN is wrong")
    return HsmPermanentError(f"HSM operation failed ({name})")


@dataclass(eq=False)
class PooledSession:
    """A session and the object handles found or created in it (valid only in this session)."""

    session: pkcs11.Session
    generation: int
    #: Private and secret key objects of the keyring, by kid.
    key_handles: dict[str, pkcs11.Object] = field(default_factory=dict)
    #: Public keys imported as session objects for ``C_Verify``, least recently used first.
    public_keys: OrderedDict[bytes, VerifyMixin] = field(default_factory=OrderedDict)
    key_epoch: int = 0


class Pkcs11Token:
    """A logged-in token with a bounded pool of sessions; see the module docstring."""

    def __init__(
        self,
        *,
        module: str,
        token_label: str,
        pin: str,
        max_sessions: int = 16,
        softhsm2_conf: str | None = None,
    ) -> None:
        self._lib = load_module(module, softhsm2_conf=softhsm2_conf)
        self.token_label = token_label
        self._pin = pin
        self._max_sessions = max_sessions
        self._condition = threading.Condition()
        self._idle: list[PooledSession] = []
        self._open_sessions = 0
        self._generation = 0
        self._key_epoch = 0
        self._restarted_at = -RESTART_INTERVAL_SECONDS
        self._token: pkcs11.Token | None = None
        self._login: pkcs11.Session | None = None
        self._closed = False
        with self._condition:
            self._connect()

    def __repr__(self) -> str:
        return f"Pkcs11Token(label={self.token_label!r}, module={self._lib.so!r})"

    @property
    def module_path(self) -> str:
        return self._lib.so

    def run(self, operation: Callable[[PooledSession], T], *, retry: bool = True) -> T:
        """Run ``operation`` with a session of its own; map errors; recover a lost session.

        ``retry`` is for idempotent operations (sign, verify, find): after a lost session
        the operation runs once more on a fresh one. Key generation passes ``False``.
        """
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            pooled = self._checkout()
            try:
                result = operation(pooled)
            except exceptions.PKCS11Error as exc:
                error = map_error(exc)
                if isinstance(error, SessionLost):
                    self._drop(pooled)
                    log.warning("HSM session lost (%s); reconnecting", type(exc).__name__)
                    self._recover(pooled.generation)
                else:
                    self._checkin(pooled)
                    # Private objects vanish from searches when the login is gone, so a
                    # missing key may be a lost login: log in again and look once more.
                    if not (isinstance(error, KeyNotFound) and self._login_again_if_lost()):
                        raise error from exc
                if attempt == attempts:
                    raise error from exc
            except BaseException:
                # Not a PKCS#11 failure, so the session may sit in an unknown state: drop it.
                self._drop(pooled)
                raise
            else:
                self._checkin(pooled)
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def forget_keys(self) -> None:
        """Drop cached key handles in every session (after a key is destroyed)."""
        with self._condition:
            self._key_epoch += 1

    def close(self) -> None:
        """Close every session; the login session last, which logs the application out."""
        with self._condition:
            self._closed = True
            self._close_idle()
            if self._login is not None:
                _close_quietly(self._login)
                self._login = None
            self._condition.notify_all()

    # -- pool ----------------------------------------------------------------------------

    def _connect(self, *, recovering: bool = False) -> None:
        try:
            token = self._lib.get_token(token_label=self.token_label)
        except exceptions.NoSuchToken as exc:
            raise HsmTransientError(
                f"no PKCS#11 token labelled {self.token_label!r} is present", retry_after=5.0
            ) from exc
        except exceptions.PKCS11Error as exc:
            if not recovering:
                raise map_error(exc) from exc
            token = self._token_after_restart(exc)
        try:
            login = token.open(user_pin=self._pin, rw=True)
        except exceptions.UserAlreadyLoggedIn:
            # Another Pkcs11Token of this process logged in; share its login, never log out.
            login = token.open(rw=True)
        except exceptions.PKCS11Error as exc:
            if recovering and not isinstance(exc, _PIN_REFUSED):
                raise HsmTransientError(
                    f"the HSM token is unavailable ({type(exc).__name__})", retry_after=5.0
                ) from exc
            raise map_error(exc) from exc
        self._token, self._login = token, login

    def _token_after_restart(self, failure: exceptions.PKCS11Error) -> pkcs11.Token:
        """The token, found again after restarting the module, when a lost token cannot be
        found any more: SoftHSM2, whose token directory went away, answers every slot
        query with ``CKR_GENERAL_ERROR`` until ``C_Finalize`` and ``C_Initialize``, and a
        network HSM that dropped the connection may too. The restart happens only while
        none of our sessions is in use (every other thread is outside the module) and at
        most every ``RESTART_INTERVAL_SECONDS``; otherwise, or if the token is still away,
        :class:`HsmTransientError`: the API answers 503 and the next request tries again.
        """
        unavailable = HsmTransientError(
            f"the HSM token is unavailable ({type(failure).__name__})", retry_after=5.0
        )
        now = time.monotonic()
        if self._open_sessions > 0 or now - self._restarted_at < RESTART_INTERVAL_SECONDS:
            raise unavailable from failure
        self._restarted_at = now
        log.warning("HSM token lost (%s): restarting the PKCS#11 module", type(failure).__name__)
        try:
            self._lib.restart()
            return self._lib.get_token(token_label=self.token_label)
        except (exceptions.PKCS11Error, HsmError) as exc:
            raise unavailable from exc

    def _checkout(self) -> PooledSession:
        with self._condition:
            while True:
                if self._closed:
                    raise HsmTransientError("the HSM token is closed")
                if self._login is None:
                    self._connect(recovering=True)
                if self._idle:
                    pooled = self._idle.pop()
                    if pooled.generation != self._generation:
                        self._open_sessions -= 1
                        _close_quietly(pooled.session)
                        continue
                    if pooled.key_epoch != self._key_epoch:
                        pooled.key_handles.clear()
                        pooled.key_epoch = self._key_epoch
                    return pooled
                if self._open_sessions < self._max_sessions:
                    return self._open_session()
                if not self._condition.wait(CHECKOUT_TIMEOUT_SECONDS):
                    raise HsmTransientError(
                        f"all {self._max_sessions} HSM sessions are busy", retry_after=1.0
                    )

    def _open_session(self) -> PooledSession:
        if self._token is None:
            raise HsmTransientError("the HSM token is not connected")
        try:
            session = self._token.open(rw=True)
        except exceptions.PKCS11Error as exc:
            error = map_error(exc)
            if isinstance(error, SessionLost):
                self._reset_locked()
            raise error from exc
        self._open_sessions += 1
        return PooledSession(session, self._generation, key_epoch=self._key_epoch)

    def _checkin(self, pooled: PooledSession) -> None:
        with self._condition:
            if self._closed or pooled.generation != self._generation:
                self._open_sessions -= 1
                _close_quietly(pooled.session)
            else:
                self._idle.append(pooled)
            self._condition.notify()

    def _drop(self, pooled: PooledSession) -> None:
        with self._condition:
            self._open_sessions -= 1
            _close_quietly(pooled.session)
            self._condition.notify()

    def _recover(self, lost_generation: int) -> None:
        with self._condition:
            if lost_generation == self._generation:
                self._reset_locked()
            # Connect again now if we can; if not, the next checkout tries again.
            if self._login is None:
                try:
                    self._connect(recovering=True)
                except HsmError as exc:
                    log.warning("HSM not back yet: %s", exc)

    def _login_again_if_lost(self) -> bool:
        """True if the application had been logged out (``C_Logout`` elsewhere, an HSM-side
        timeout) and is logged in again; False if the login was intact."""
        with self._condition:
            if self._login is None:
                return False
            functions = _function_list(self._lib.so)
            info = _SessionInfo()
            handle = session_handle(self._login)
            if functions.C_GetSessionInfo(handle, ctypes.byref(info)) != CKR_OK:
                self._reset_locked()  # the login session itself is gone: reconnect
                self._connect()
                return True
            if info.state in CKS_USER_STATES:
                return False
            pin = self._pin.encode("utf-8")
            rv = functions.C_Login(handle, CKU_USER, pin, len(pin))
            if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
                raise HsmPermanentError(f"HSM login failed again (CKR 0x{rv:x})")
            log.warning("the HSM login had been lost; logged in again")
            return True

    def _reset_locked(self) -> None:
        self._generation += 1
        self._close_idle()
        if self._login is not None:
            _close_quietly(self._login)
        self._token, self._login = None, None

    def _close_idle(self) -> None:
        for pooled in self._idle:
            _close_quietly(pooled.session)
        self._open_sessions -= len(self._idle)
        self._idle.clear()


def session_handle(session: pkcs11.Session) -> int:
    """The ``CK_SESSION_HANDLE`` (python-pkcs11 has it but its type stubs do not say so)."""
    handle: int = session.handle  # type: ignore[attr-defined]
    return handle


def can_sign(found: pkcs11.Object) -> SignMixin:
    """``found`` as a signing key, or :class:`HsmPermanentError` if ``CKA_SIGN`` is false."""
    if not isinstance(found, SignMixin):
        raise HsmPermanentError("the HSM key object cannot sign")
    return found


def can_encrypt(found: pkcs11.Object) -> EncryptMixin:
    """``found`` as an encryption key, or :class:`HsmPermanentError` if ``CKA_ENCRYPT`` is false."""
    if not isinstance(found, EncryptMixin):
        raise HsmPermanentError("the HSM key object cannot encrypt")
    return found


def can_decrypt(found: pkcs11.Object) -> DecryptMixin:
    """``found`` as a decryption key, or :class:`HsmPermanentError` if ``CKA_DECRYPT`` is false."""
    if not isinstance(found, DecryptMixin):
        raise HsmPermanentError("the HSM key object cannot decrypt")
    return found


def can_verify(found: pkcs11.Object) -> VerifyMixin:
    """``found`` as a verification key, or :class:`HsmPermanentError` if ``CKA_VERIFY`` is false."""
    if not isinstance(found, VerifyMixin):
        raise HsmPermanentError("the HSM key object cannot verify")
    return found


def _close_quietly(session: pkcs11.Session) -> None:
    try:
        session.close()
    except exceptions.PKCS11Error as exc:
        log.debug("closing a PKCS#11 session failed: %s", type(exc).__name__)


def initialise_token(
    *, module: str, label: str, so_pin: str, user_pin: str, softhsm2_conf: str | None = None
) -> bool:
    """Initialise a free slot's token as ``label`` with a user PIN. False if it already exists.

    For SoftHSM2 and test tokens; a production HSM's token is made in its key ceremony.
    PINs pass through memory only, never through a command line.
    """
    lib = load_module(module, softhsm2_conf=softhsm2_conf)
    if any(True for _ in lib.get_tokens(token_label=label)):
        return False
    free = next(
        (
            slot
            for slot in lib.get_slots(token_present=True)
            if not slot.get_token().flags & pkcs11.TokenFlag.TOKEN_INITIALIZED
        ),
        None,
    )
    if free is None:
        raise HsmPermanentError("no free slot to initialise a token in")
    encoded_label = label.encode("utf-8")
    if len(encoded_label) > 32:
        raise HsmPermanentError("a PKCS#11 token label has at most 32 bytes")
    so_pin_bytes = so_pin.encode("utf-8")
    rv = _function_list(module).C_InitToken(
        free.slot_id, so_pin_bytes, len(so_pin_bytes), encoded_label.ljust(32, b" ")
    )
    if rv != CKR_OK:
        raise HsmPermanentError(f"C_InitToken failed (CKR 0x{rv:x})")
    try:
        token = lib.get_token(token_label=label)
        with token.open(so_pin=so_pin, rw=True) as session:
            session.init_pin(user_pin)
    except exceptions.PKCS11Error as exc:
        raise map_error(exc) from exc
    log.info("initialised PKCS#11 token %r", label)
    return True
