"""Build of the one C extension, hsm._p256 (batch ECDSA verification; see hsm/_p256.c).

Everything else about the distribution is in pyproject.toml.
"""

import shutil
import subprocess

from setuptools import Extension, setup


def libcrypto_flags() -> dict[str, list[str]]:
    """Include and library directories of libcrypto from pkg-config (Homebrew keeps it apart)."""
    pkg_config = shutil.which("pkg-config")
    if pkg_config is None:
        return {}
    found = subprocess.run(  # noqa: S603 - fixed arguments, no shell
        [pkg_config, "--cflags-only-I", "--libs-only-L", "libcrypto"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        return {}
    flags = found.stdout.split()
    return {
        "include_dirs": [flag[2:] for flag in flags if flag.startswith("-I")],
        "library_dirs": [flag[2:] for flag in flags if flag.startswith("-L")],
    }


setup(
    ext_modules=[
        Extension(
            "hsm._p256",
            sources=["hsm/_p256.c"],
            libraries=["crypto"],
            # EC_KEY and ECDSA_do_verify are deprecated in OpenSSL 3 and kept on purpose.
            extra_compile_args=["-Wno-deprecated-declarations"],
            **libcrypto_flags(),
        )
    ]
)
