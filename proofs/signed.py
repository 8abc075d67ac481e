"""A record and one BLS signature over it: the wrapper of run headers, manifests and verdicts.

On disk a signed record is ``{KEY: record.to_json(), "signature": "0x" + 96 bytes of hex}``,
where KEY names the record ("header", "manifest", "verdict"). The signature is
:func:`proofs.signatures.sign` under the kind's :class:`~proofs.signatures.Domain`, with the
record's ``signing_context()`` (its run id) as context and ``signing_payload()`` (its hash, or
its canonical bytes) as payload. Each kind is a thin frozen subclass of :class:`Signed` that names
its record field, its domain and its record reader; tests/vectors pin the bytes of all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, cast

from proofs import signatures
from proofs.codec import check_keys, get_bytes, to_hex
from proofs.errors import EncodingError
from proofs.signatures import SIGNATURE_SIZE, Domain, KeyPair


class Signable(Protocol):
    """A record that can be signed: its JSON form, and the context and payload signed over."""

    @classmethod
    def from_json(cls, obj: Any) -> Self:
        """The strict reader; raises EncodingError."""
        ...

    def to_json(self) -> dict[str, Any]: ...

    def signing_context(self) -> str: ...

    def signing_payload(self) -> bytes: ...


R = TypeVar("R", bound=Signable)


@dataclass(frozen=True, kw_only=True, slots=True)
class Signed(Generic[R]):
    """A record of type ``R`` and the signature over it. Subclasses declare the record field,
    named ``KEY`` (so callers keep ``SignedRunHeader(header=...)`` and ``signed.header``)."""

    KEY: ClassVar[str]
    """The record's field name and JSON key."""
    DOMAIN: ClassVar[Domain]
    RECORD: ClassVar[type[Signable]]
    """The record class, whose ``from_json`` reads the record."""
    ERROR: ClassVar[type[EncodingError]] = EncodingError
    """What :meth:`from_json` raises, so that every reader of a kind raises one type."""

    signature: bytes

    @property
    def record(self) -> R:
        return cast(R, getattr(self, self.KEY))

    def to_json(self) -> dict[str, Any]:
        return {self.KEY: self.record.to_json(), "signature": to_hex(self.signature)}

    @classmethod
    def from_json(cls, obj: Any) -> Self:
        """Read ``{KEY: ..., "signature": ...}`` strictly; raises ``ERROR`` (an EncodingError)."""
        try:
            check_keys(obj, f"signed {cls.KEY}", (cls.KEY, "signature"))
            record = cls.RECORD.from_json(obj[cls.KEY])
            signature = get_bytes(obj, "signature", SIGNATURE_SIZE)
        except EncodingError as exc:
            if isinstance(exc, cls.ERROR):
                raise
            raise cls.ERROR(str(exc)) from exc
        return cls(signature=signature, **{cls.KEY: record})

    @classmethod
    def sign(cls, keypair: KeyPair, record: R) -> Self:
        """Sign ``record``; SignatureError on a bad key."""
        context, payload = record.signing_context(), record.signing_payload()
        signature = signatures.sign(keypair, cls.DOMAIN, context, payload)
        return cls(signature=bytes(signature), **{cls.KEY: record})

    def verify(self, pubkey: bytes) -> bool:
        """True when ``pubkey`` signed this record. Never raises."""
        record = self.record
        try:
            context, payload = record.signing_context(), record.signing_payload()
        except Exception:  # a record built in code that has no canonical form is not signed
            return False
        return signatures.verify(pubkey, self.DOMAIN, context, payload, self.signature)
