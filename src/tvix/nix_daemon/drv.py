"""Just enough of a ``.drv`` file (ATerm) to answer output queries about stored derivations."""

from __future__ import annotations

__all__ = ["parse_drv_outputs"]

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r} at offset {self.pos}")
        self.pos += len(token)

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def string(self) -> str:
        self.expect('"')
        out: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text):
                raise ValueError("unterminated string")
            c = text[self.pos]
            self.pos += 1
            if c == '"':
                return "".join(out)
            if c == "\\":
                if self.pos >= len(text):
                    raise ValueError("unterminated string")
                e = text[self.pos]
                self.pos += 1
                out.append(_ESCAPES.get(e, e))
            else:
                out.append(c)


def parse_drv_outputs(text: str) -> dict[str, str]:
    """The outputs of a derivation: name → output path (``""`` for a floating CA output).

    Raises :class:`ValueError` if ``text`` does not start like a derivation.
    """
    r = _Reader(text)
    r.expect("Derive([")
    outputs: dict[str, str] = {}
    while not r.peek("]"):
        if outputs:
            r.expect(",")
        r.expect("(")
        name = r.string()
        r.expect(",")
        path = r.string()
        r.expect(",")
        r.string()
        r.expect(",")
        r.string()
        r.expect(")")
        outputs[name] = path
    return outputs
