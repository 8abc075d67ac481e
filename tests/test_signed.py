"""proofs.signed: the generic signed record, on a toy record (the real kinds are pinned by
tests/vectors through test_trainer_vectors.py and test_audit_verdict.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from proofs.codec import check_keys, get_str
from proofs.errors import EncodingError, SignatureError
from proofs.signatures import Domain, keypair_from_seed, sign
from proofs.signed import Signed

KEY = keypair_from_seed(b"\x07" * 32)
OTHER = keypair_from_seed(b"\x08" * 32)


@dataclass(frozen=True, kw_only=True, slots=True)
class Note:
    run_id: str
    text: str

    @classmethod
    def from_json(cls, obj: Any) -> Note:
        check_keys(obj, "note", ("run_id", "text"))
        return cls(run_id=get_str(obj, "run_id"), text=get_str(obj, "text"))

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "text": self.text}

    def signing_context(self) -> str:
        return self.run_id

    def signing_payload(self) -> bytes:
        if self.text == "unencodable":
            raise EncodingError("no canonical form")
        return self.text.encode()


class NoteError(EncodingError):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedNote(Signed[Note]):
    KEY = "note"
    DOMAIN = Domain.VERDICT
    RECORD = Note
    ERROR = NoteError

    note: Note


NOTE = Note(run_id="run-1", text="hello")


def test_sign_covers_domain_context_and_payload() -> None:
    signed = SignedNote.sign(KEY, NOTE)
    assert signed.note is NOTE and signed.record is NOTE
    assert signed.signature == sign(KEY, Domain.VERDICT, "run-1", b"hello")
    assert signed.verify(KEY.public)
    assert not signed.verify(OTHER.public)
    moved = SignedNote(note=Note(run_id="run-10", text="hello"), signature=signed.signature)
    assert not moved.verify(KEY.public)
    with pytest.raises(SignatureError):
        SignedNote.sign(None, NOTE)  # type: ignore[arg-type]


def test_json_round_trip_and_layout() -> None:
    signed = SignedNote.sign(KEY, NOTE)
    obj = signed.to_json()
    assert obj == {"note": NOTE.to_json(), "signature": "0x" + signed.signature.hex()}
    assert SignedNote.from_json(obj) == signed


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "signed note: expected a JSON object"),
        ({"note": {"run_id": "r", "text": "t"}}, r"signed note: missing keys \['signature'\]"),
        ({"note": {}, "signature": "0x" + "00" * 96}, "note: missing keys"),
        ({"note": {"run_id": "r", "text": "t"}, "signature": "0x00"}, "expected 96 bytes, got 1"),
        ({"note": {"run_id": "r", "text": "t"}, "signature": "0x" + "00" * 96, "x": 1}, "unknown"),
    ],
)
def test_from_json_is_strict_and_raises_the_kinds_error(obj: Any, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        SignedNote.from_json(obj)


def test_verify_never_raises() -> None:
    signed = SignedNote.sign(KEY, NOTE)
    assert not SignedNote(note=Note(run_id="run-1", text="unencodable"), signature=b"").verify(
        KEY.public
    )
    assert not SignedNote(note=NOTE, signature=b"\x00" * 96).verify(KEY.public)
    assert not SignedNote(note=Note(run_id="", text="x"), signature=signed.signature).verify(
        KEY.public
    )
    assert not signed.verify(b"short")
