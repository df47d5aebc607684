"""narinfo: the metadata file of a store path in a Nix binary cache.

:func:`NarInfo.parse` accepts what Nix 2.8 accepts (and rejects what it
rejects, with a message saying why); :meth:`NarInfo.render` writes exactly
what Nix writes. The signed fingerprint is a function of its own
(:func:`fingerprint`) so that other path metadata can be signed the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash
from tvix.nixcompat.errors import (
    InvalidCAHashError,
    InvalidHashError,
    InvalidStorePathError,
    NarInfoError,
    SignatureError,
)
from tvix.nixcompat.hashes import HashAlgo, parse_hash
from tvix.nixcompat.signing import Signature, SigningKey, VerifyingKey, verify_any
from tvix.nixcompat.storepath import StorePath

__all__ = ["NarInfo", "fingerprint"]


def _as_store_path(path: StorePath | str) -> StorePath:
    if isinstance(path, StorePath):
        return path
    if path.startswith("/"):
        return StorePath.from_absolute_path(path)
    return StorePath.from_base_name(path)


def fingerprint(
    store_path: StorePath | str,
    nar_sha256: bytes,
    nar_size: int,
    references: Iterable[StorePath | str],
) -> str:
    """Return the string Nix signs for a store path.

    ``1;<store path>;sha256:<nixbase32 NAR hash>;<NAR size>;<refs>``, where
    ``<refs>`` are the full reference paths, sorted, comma-separated.

    Paths may be :class:`StorePath` objects, absolute paths or base names.

    Raises:
        InvalidStorePathError: a malformed path.
        ValueError: *nar_sha256* is not 32 bytes.
    """
    if len(nar_sha256) != 32:
        raise ValueError(f"NAR sha256 must be 32 bytes, not {len(nar_sha256)}")
    refs = ",".join(sorted({_as_store_path(r).absolute_path for r in references}))
    path = _as_store_path(store_path).absolute_path
    return f"1;{path};sha256:{nixbase32.encode(nar_sha256)};{nar_size};{refs}"


def _check_line(value: str, field: str) -> None:
    if "\n" in value or "\r" in value:
        raise NarInfoError(f"narinfo {field} must not contain line breaks: {value!r}")


@dataclass(frozen=True, slots=True)
class NarInfo:
    """The content of a ``<hash>.narinfo`` file.

    Hashes are raw sha256 digests. *references* and *signatures* are kept in
    the given order (rendering sorts them, as Nix does). *compression*
    defaults to ``none`` here; a parsed narinfo without a ``Compression``
    line means ``bzip2``, as in Nix. *file_hash* / *file_size* may be
    unknown (``None``; those lines are then left out, which Nix accepts).

    Raises :class:`NarInfoError` on construction if a field is invalid.
    """

    store_path: StorePath
    url: str
    nar_hash: bytes
    nar_size: int
    compression: str = "none"
    file_hash: bytes | None = None
    file_size: int | None = None
    references: tuple[StorePath, ...] = ()
    deriver: StorePath | None = None
    system: str | None = None
    signatures: tuple[Signature, ...] = ()
    ca: CAHash | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store_path, StorePath):
            raise NarInfoError(f"store_path must be a StorePath, not {self.store_path!r}")
        if not self.url:
            raise NarInfoError("narinfo URL must not be empty")
        _check_line(self.url, "URL")
        if not self.compression:
            raise NarInfoError("narinfo Compression must not be empty")
        _check_line(self.compression, "Compression")
        if self.system is not None:
            _check_line(self.system, "System")
        if len(self.nar_hash) != 32:
            raise NarInfoError(f"NarHash must be a 32-byte sha256, not {len(self.nar_hash)} bytes")
        if self.nar_size <= 0:
            raise NarInfoError(f"NarSize must be positive, not {self.nar_size}")
        if self.file_hash is not None and len(self.file_hash) != 32:
            raise NarInfoError(
                f"FileHash must be a 32-byte sha256, not {len(self.file_hash)} bytes"
            )
        if self.file_size is not None and self.file_size < 0:
            raise NarInfoError(f"FileSize must not be negative, not {self.file_size}")
        # Accept any iterable but store tuples, so the value stays immutable.
        object.__setattr__(self, "references", tuple(self.references))
        object.__setattr__(self, "signatures", tuple(self.signatures))

    @classmethod
    def parse(cls, text: str | bytes) -> NarInfo:
        r"""Parse narinfo *text*: lines ``Key: value``, each ending in ``\n``.

        Hashes may be ``sha256:`` + nixbase32, base16 or base64, or SRI
        ``sha256-<base64>``. Unknown keys are ignored; ``Deriver:
        unknown-deriver`` means no deriver.

        Raises:
            NarInfoError: CR characters, a line without ``": "``, a missing
                final newline, a missing or empty ``StorePath``, ``URL``,
                ``NarHash`` or ``NarSize``, or any malformed value; the
                message names the line.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError as e:
                raise NarInfoError(f"narinfo is not UTF-8: {e}") from None
        if "\r" in text:
            raise NarInfoError("narinfo contains a carriage return (CRLF line endings?)")
        if not text.endswith("\n"):
            raise NarInfoError("narinfo does not end with a newline")
        fields: dict[str, object] = {}
        references: list[StorePath] | None = None
        signatures: list[Signature] = []
        compression: str | None = None
        for number, line in enumerate(text[:-1].split("\n"), start=1):
            key, sep, value = line.partition(": ")
            if not sep:
                raise NarInfoError(f"narinfo line {number} is not 'Key: value': {line!r}")
            try:
                if key == "StorePath":
                    fields["store_path"] = StorePath.from_absolute_path(value)
                elif key == "URL":
                    fields["url"] = value
                elif key == "Compression":
                    compression = value
                elif key == "FileHash":
                    fields["file_hash"] = _parse_sha256(value)
                elif key == "FileSize":
                    fields["file_size"] = _parse_int(value)
                elif key == "NarHash":
                    fields["nar_hash"] = _parse_sha256(value)
                elif key == "NarSize":
                    fields["nar_size"] = _parse_int(value)
                elif key == "References":
                    if references:
                        raise NarInfoError("References given twice")
                    references = [StorePath.from_base_name(r) for r in value.split(" ") if r]
                elif key == "Deriver":
                    if value != "unknown-deriver":
                        fields["deriver"] = StorePath.from_base_name(value)
                elif key == "System":
                    fields["system"] = value
                elif key == "Sig":
                    signatures.append(Signature.parse(value))
                elif key == "CA":
                    if "ca" in fields:
                        raise NarInfoError("CA given twice")
                    fields["ca"] = CAHash.parse(value)
            except (
                InvalidStorePathError,
                InvalidHashError,
                InvalidCAHashError,
                SignatureError,
                NarInfoError,
            ) as e:
                raise NarInfoError(f"narinfo line {number} ({key}): {e}") from None
        missing = [
            key
            for key, field in (
                ("StorePath", "store_path"),
                ("URL", "url"),
                ("NarHash", "nar_hash"),
                ("NarSize", "nar_size"),
            )
            if not fields.get(field)
        ]
        if missing:
            raise NarInfoError(f"narinfo lacks {', '.join(missing)} (or it is empty or zero)")
        return cls(
            compression=compression if compression else "bzip2",
            references=tuple(references or ()),
            signatures=tuple(signatures),
            **fields,  # type: ignore[arg-type]
        )

    def render(self) -> str:
        r"""Return the narinfo text exactly as Nix writes it.

        Key order ``StorePath``, ``URL``, ``Compression``, ``FileHash``,
        ``FileSize``, ``NarHash``, ``NarSize``, ``References`` (sorted base
        names, the line present even when empty), ``Deriver``, ``System``,
        ``Sig`` (sorted, one per signature), ``CA``; hashes as
        ``sha256:<nixbase32>``; every line ends in ``\n``.
        """
        lines = [
            f"StorePath: {self.store_path.absolute_path}\n",
            f"URL: {self.url}\n",
            f"Compression: {self.compression}\n",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: sha256:{nixbase32.encode(self.file_hash)}\n")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}\n")
        lines.append(f"NarHash: sha256:{nixbase32.encode(self.nar_hash)}\n")
        lines.append(f"NarSize: {self.nar_size}\n")
        refs = sorted({r.base_name for r in self.references})
        lines.append(f"References: {' '.join(refs)}\n")
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver.base_name}\n")
        if self.system is not None:
            lines.append(f"System: {self.system}\n")
        lines.extend(f"Sig: {sig}\n" for sig in sorted({str(s) for s in self.signatures}))
        if self.ca is not None:
            lines.append(f"CA: {self.ca}\n")
        return "".join(lines)

    def __str__(self) -> str:
        return self.render()

    def fingerprint(self) -> str:
        """Return the fingerprint that signatures sign (see :func:`fingerprint`)."""
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.references)

    def sign(self, key: SigningKey) -> NarInfo:
        """Return a copy with *key*'s signature added (if not already there)."""
        signature = key.sign(self.fingerprint())
        if signature in self.signatures:
            return self
        return dataclasses.replace(self, signatures=(*self.signatures, signature))

    def verify(self, keys: Mapping[str, VerifyingKey] | Iterable[VerifyingKey]) -> bool:
        """Return whether at least one signature is valid under one of *keys*."""
        return verify_any(self.fingerprint(), self.signatures, keys)


def _parse_sha256(value: str) -> bytes:
    algo, digest = parse_hash(value)
    if algo is not HashAlgo.SHA256:
        raise NarInfoError(f"hash {value!r} is not sha256")
    return digest


def _parse_int(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise NarInfoError(f"{value!r} is not a non-negative integer")
    return int(value)
