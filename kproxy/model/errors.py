"""ManifestError: what went wrong in which file, document, object and field."""

from __future__ import annotations

from typing import List, Optional

try:  # the project's common base, so a CLI can catch every user-facing error at once
    from kproxy.errors import KproxyError as _Base
except ImportError:  # pragma: no cover - the model must stay importable on its own
    _Base = ValueError


class ManifestError(_Base):
    """A manifest that kubectl (or the API server) would refuse.

    Attributes name the place: ``file`` (a path, or ``-`` for stdin), ``doc_index``
    (0-based index of the YAML document in that file), ``item_index`` (index inside a
    ``kind: List``, else None), ``obj`` (``Kind namespace/name`` as far as known),
    ``field`` (a field path such as ``spec.ports[0].port``) and ``reason``.

    A whole load is validated before anything is returned; when several problems are
    found, one ManifestError is raised whose attributes are those of the first problem
    and whose ``errors`` lists all of them.
    """

    def __init__(self, reason: str, *, file: str = "", doc_index: Optional[int] = None,
                 item_index: Optional[int] = None, obj: str = "", field: str = "",
                 errors: Optional[List["ManifestError"]] = None):
        self.reason = reason
        self.file = file
        self.doc_index = doc_index
        self.item_index = item_index
        self.obj = obj
        self.field = field
        self.errors: List[ManifestError] = list(errors) if errors else [self]
        super().__init__(self._message())

    def location(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.doc_index is not None:
            where = f"document {self.doc_index}"
            if self.item_index is not None:
                where += f" item {self.item_index}"
            parts.append(where)
        if self.obj:
            parts.append(self.obj)
        return ": ".join(parts)

    def one_line(self) -> str:
        head = self.location()
        body = f"{self.field}: {self.reason}" if self.field else self.reason
        return f"{head}: {body}" if head else body

    def _message(self) -> str:
        if len(self.errors) <= 1:
            return self.one_line()
        lines = [self.one_line(), f"({len(self.errors) - 1} more error(s) in this load:)"]
        lines += ["  " + e.one_line() for e in self.errors[1:]]
        return "\n".join(lines)

    @classmethod
    def collect(cls, errors: List["ManifestError"]) -> "ManifestError":
        """One error that carries all of ``errors`` (the first one names the place)."""
        first = errors[0]
        return cls(first.reason, file=first.file, doc_index=first.doc_index,
                   item_index=first.item_index, obj=first.obj, field=first.field,
                   errors=errors)
