"""Reading manifests the way ``kubectl apply -f`` does.

``load(paths)`` accepts files, directories (their ``*.yaml``, ``*.yml`` and ``*.json``
files in lexical order, not recursing, as kubectl does without ``-R``) and ``-`` for
stdin. Files may hold several YAML documents; empty documents are skipped and the items
of a ``kind: List`` are expanded in place.

Validation is all-or-nothing: every object of every path is decoded and validated first,
and if anything is wrong one ManifestError listing every problem is raised (nothing is
returned half). ``strict=True`` rejects unknown fields like kubectl's default strict
field validation; ``strict=False`` drops them with a warning like ``--validate=false``.
Type errors (a string where an integer belongs) are errors either way, as they are for
the API server's decoder.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, TextIO, Tuple, Union

import yaml

from kproxy.model import objects as o
from kproxy.model.errors import ManifestError
from kproxy.model.parse import CLUSTER_SCOPED, PARSERS, Issues, parse_meta
from kproxy.model.schema import KIND_SCHEMAS, drop_unknown, unknown_fields
from kproxy.model.validate import VALIDATORS

MANIFEST_EXTENSIONS = (".yaml", ".yml", ".json")


@dataclass
class LoadedObject:
    """One object read from a manifest, and where it came from."""

    source: str                     # file path, or "-" for stdin
    doc_index: int                  # 0-based YAML document index in that file
    kind: str
    api_version: str
    obj: o.KubeObject
    item_index: Optional[int] = None   # index inside a kind: List document
    warnings: List[str] = field(default_factory=list)

    @property
    def emulated(self) -> bool:
        return not isinstance(self.obj, o.NotEmulated)

    @property
    def name(self) -> str:
        return self.obj.metadata.name

    @property
    def namespace(self) -> Optional[str]:
        return self.obj.metadata.namespace

    @property
    def key(self) -> Tuple[str, Optional[str], str]:
        """(kind, namespace, name): the identity ``kubectl apply`` updates by."""
        return (self.kind, self.namespace, self.name)

    def ref(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {ns}{self.name}"


def expand_paths(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> List[str]:
    """The files ``kubectl apply -f`` would read for ``paths``, in its order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[str] = []
    for p in paths:
        p = os.fspath(p)
        if p == "-":
            files.append(p)
        elif os.path.isdir(p):
            for entry in sorted(os.listdir(p)):
                full = os.path.join(p, entry)
                if os.path.isfile(full) and entry.endswith(MANIFEST_EXTENSIONS):
                    files.append(full)
        elif os.path.exists(p):
            files.append(p)
        else:
            raise ManifestError(f'the path "{p}" does not exist', file=p)
    return files


def load(paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], *, strict: bool = True,
         validate: bool = True, stdin: Optional[TextIO] = None,
         default_namespace: str = o.DEFAULT_NAMESPACE) -> List[LoadedObject]:
    """Read, decode and validate manifests; see the module docstring.

    ``validate=False`` skips the semantic checks (names, port ranges...) but still
    decodes types and applies ``strict``; it exists for test fixtures that carry values
    the API server would refuse.
    """
    errors: List[ManifestError] = []
    loaded: List[LoadedObject] = []
    for path in expand_paths(paths):
        text = _read(path, stdin)
        name = _source_name(stdin) if path == "-" else path
        for doc_index, doc, err in _documents(name, text):
            if err is not None:
                errors.append(err)
                continue
            for item_index, item in _expand_list(doc):
                result = _decode(name, doc_index, item_index, item, strict, validate,
                                 default_namespace)
                if isinstance(result, LoadedObject):
                    loaded.append(result)
                else:
                    errors.extend(result)
    if errors:
        raise ManifestError.collect(errors)
    return loaded


def decode(doc: Dict[str, Any], *, source: str = "<object>", strict: bool = False, validate: bool = False,
           default_namespace: str = o.DEFAULT_NAMESPACE) -> LoadedObject:
    """One manifest already decoded (a dict, e.g. from JSON), as ``load`` would give it;
    raises ManifestError.  For manifests kproxy stored itself: no YAML parsing."""
    result = _decode(source, 0, None, doc, strict, validate, default_namespace)
    if isinstance(result, LoadedObject):
        return result
    raise ManifestError.collect(result)


def loads(text: str, *, source: str = "<string>", **kwargs: Any) -> List[LoadedObject]:
    """``load`` for manifest text already in memory (``source`` names it in errors)."""
    return load("-", stdin=_Named(text, source), **kwargs)


class _Named(io.StringIO):
    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.source_name = name


def _read(path: str, stdin: Optional[TextIO]) -> str:
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        return stream.read()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read: {exc}", file=path) from exc


def _documents(path: str, text: str):
    """(doc_index, document, error) for each non-empty YAML document."""
    index = 0
    try:
        for doc in yaml.safe_load_all(text):
            if doc is None:
                index += 1
                continue
            if not isinstance(doc, dict):
                yield index, None, ManifestError(
                    f"a manifest document must be a map, got {type(doc).__name__}: {str(doc)[:60]!r}",
                    file=path, doc_index=index)
            else:
                yield index, doc, None
            index += 1
    except yaml.YAMLError as exc:
        yield index, None, ManifestError(f"invalid YAML: {exc}", file=path, doc_index=index)


def _expand_list(doc: dict):
    if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            yield i, item
    else:
        yield None, doc


def _decode(path: str, doc_index: int, item_index: Optional[int], doc: Any, strict: bool,
            validate: bool, default_namespace: str):
    where = dict(file=path, doc_index=doc_index, item_index=item_index)
    if not isinstance(doc, dict):
        return [ManifestError("a List item must be a map", **where)]
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    missing = [f for f, v in (("apiVersion", api_version), ("kind", kind)) if not v]
    if missing:
        return [ManifestError("error validating data: [" + ", ".join(f"{m} not set" for m in missing)
                              + "]", **where)]
    if not isinstance(kind, str) or not isinstance(api_version, str):
        return [ManifestError("apiVersion and kind must be strings", **where)]
    if kind not in PARSERS:
        issues = Issues()
        meta = parse_meta(issues, doc, kind not in CLUSTER_SCOPED, default_namespace)
        obj = o.NotEmulated(api_version=api_version, kind=kind, metadata=meta, raw=doc)
        return LoadedObject(path, doc_index, kind, api_version, obj, item_index,
                            [f"{kind} {meta.name}: kind {kind} is not emulated by kproxy; ignored"])
    versions, parser = PARSERS[kind]
    meta_issues = Issues()
    meta = parse_meta(meta_issues, doc, kind != "Namespace", default_namespace)
    ns = f"{meta.namespace}/" if meta.namespace else ""
    ref = f"{kind} {ns}{meta.name or '<no name>'}"
    if api_version not in versions:
        return [ManifestError(f'no matches for kind "{kind}" in version "{api_version}" '
                              f"(kproxy serves {', '.join(versions)})", obj=ref, **where)]
    warnings: List[str] = []
    problems: List[Tuple[str, str]] = []
    unknown = unknown_fields(doc, KIND_SCHEMAS[kind])
    if unknown:
        if strict:
            problems += [(p, f'strict decoding error: unknown field "{p}"') for p in unknown]
        else:
            warnings += [f'{ref}: unknown field "{p}" dropped (validation off)' for p in unknown]
            doc = drop_unknown(doc, unknown)
    issues = Issues()
    obj = parser(issues, doc, default_namespace)
    problems += issues.items
    if validate and not issues:
        problems += VALIDATORS[kind](obj)
    if problems:
        return [ManifestError(reason, obj=ref, field=fpath, **where) for fpath, reason in problems]
    if isinstance(obj, o.ResourceQuota):
        warnings += [f"{ref}: {w}" for w in obj.warnings()]
    if isinstance(obj, o.EndpointSlice) and not obj.service_name:
        warnings.append(f"{ref}: no {o.SERVICE_NAME_LABEL} label; kube-proxy ignores this slice")
    return LoadedObject(path, doc_index, kind, api_version, obj, item_index, warnings)


def _source_name(stdin: Optional[TextIO]) -> str:
    return getattr(stdin, "source_name", "-")
