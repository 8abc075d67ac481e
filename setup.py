"""Declares the optional native accelerator; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: where OpenSSL's headers or a compiler are missing the build goes on without
        # it and proofs.merkle falls back to hashlib (same results, slower on small leaves).
        Extension(
            "proofs._sha256tree",
            ["proofs/_sha256tree.c"],
            libraries=["crypto"],
            extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
