"""A Kubernetes API emulator for the operator tests: KMock 0.8 plus the workarounds TESTING.md lists.

Run it as a process (``python emulator.py --port PORT``); it prints ``KMOCK_URL=http://127.0.0.1:PORT`` once
it serves. ``--no-fixes`` serves bare KMock (used by the test that proves each workaround is still
needed and still works); ``--no-crd`` leaves ``jest.training`` undiscoverable until a CRD is applied.

KMock is an in-memory object store over HTTP by Kopf's author. What we add, each behind ``FIXES``:

1. ``GET /api/v1/namespaces[/NAME]`` crashes KMock's path parser -> a corrected parser.
2. PUT maps to no action (404) -> treated as UPDATE (a merge, approximating replace).
3. ``/apis/`` with a trailing slash 404s -> the slash is stripped.
4. create answers 200 -> 201 (kubernetes client >= 35 returns None for 200 on create).
5. the core group version renders as ``/v1`` -> ``v1`` (kubectl discovery).
6. ``labelSelector`` is ignored on lists -> equality-based selectors are applied.
7. ``generateName`` is ignored -> a name is generated (Kopf's events would collide with 409).
8. lists lack ``kind``/``apiVersion`` -> added (kubectl decodes lists by kind).
9. watch streams are ``application/octet-stream`` -> ``application/json`` (client-go).
10. a created CRD does not make its kind discoverable -> registered on create.
11. no ``uid``/``resourceVersion``/``creationTimestamp``/``generation`` -> injected; ``generation``
    increments when a spec changes (so ``observedGeneration`` means something).
12. printer columns: ``kubectl get`` asks for ``as=Table`` -> a Table built from the CRD's
    ``additionalPrinterColumns`` (simple JSONPaths), like the real API server; other kinds get Name + Age.
13. KMock records every request and matches each new one against its reactions by scanning that whole
    history (``request in view``), so serving gets quadratically slower (~50 ms CPU per request after a
    few thousand) -> the history is trimmed to the requests still in flight (we never assert on it).

What it still never does: garbage collection, pod phases (tests or the e2e kubelet patch them),
schema validation/defaulting, admission, strategic merge, watch resumption.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import re
import signal
import uuid
from typing import Any

import kmock
from kmock._internal import enums, parsing

FIXES = True
_resource_versions = itertools.count(1)
_original_parse_path = parsing.parse_path
_original_guess_k8s = parsing.guess_k8s


def _fixed_parse_path(path: str) -> parsing.ParsedPath:
    """Fix 1: KMock 0.8 crashes on ``/api/v1/namespaces`` and misreads ``/api/v1/namespaces/NAME``."""
    parts = path.strip("/").split("/")
    core_namespaces = parts[:1] == ["api"] and len(parts) >= 3 and parts[2] == "namespaces"
    if core_namespaces and (len(parts) in (3, 4) or (len(parts) == 5 and parts[4] in ("status", "finalize"))):
        return parsing.ParsedPath(
            "", parts[1], "namespaces", None, parts[3] if len(parts) > 3 else None, parts[4] if len(parts) > 4 else None
        )
    return _original_parse_path(path)


def _fixed_guess_k8s(k8s: parsing.ParsedPath, method: enums.method, query: dict[str, str]) -> enums.action | None:
    """Fix 2: PUT on a named object is an UPDATE."""
    if method == enums.method.PUT and k8s.group is not None and k8s.name is not None:
        return enums.action.UPDATE
    return _original_guess_k8s(k8s, method, query)


def install_parser_fixes() -> None:
    """Patch KMock's module-level parsers (fixes 1 and 2); idempotent."""
    parsing.parse_path = _fixed_parse_path
    parsing.guess_k8s = _fixed_guess_k8s


def label_selector_matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``), comma-separated (fix 6)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


_JSONPATH_STEP = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]")


def jsonpath_value(obj: Any, path: str) -> Any:
    """Evaluate the simple JSONPaths printer columns use (``.status.phase``, ``.a.b[0].c``); None if absent."""
    path = path.strip().removeprefix("{").removesuffix("}").removeprefix("$")
    position, value = 0, obj
    for match in _JSONPATH_STEP.finditer(path):
        if match.start() != position:
            return None
        position = match.end()
        if match.group(1) is not None:
            value = value.get(match.group(1)) if isinstance(value, dict) else None
        else:
            index = int(match.group(2))
            value = value[index] if isinstance(value, list) and index < len(value) else None
        if value is None:
            return None
    return value if position == len(path) else None


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """``kubectl``'s short age format (``42s``, ``5m``, ``3h``, ``2d``) of an RFC 3339 timestamp."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    seconds = max(0, int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cell(value: Any, column_type: str) -> Any:
    if column_type == "date":
        return human_age(value) if value is not None else "<none>"
    if value is None:
        return None
    if column_type == "integer" and isinstance(value, int | float):
        return int(value)
    if column_type == "number" and isinstance(value, int | float):
        return value
    if isinstance(value, dict | list):
        return str(value)
    return value


def render_table(objects: list[dict], columns: list[dict] | None) -> dict:
    """A ``meta.k8s.io/v1`` Table for ``objects``: Name, then the CRD's printer columns (or Age)."""
    columns = columns if columns else [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    definitions = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
    definitions += [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        cells = [metadata.get("name")]
        cells += [_cell(jsonpath_value(obj, c["jsonPath"]), c.get("type", "string")) for c in columns]
        rows.append(
            {
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata},
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(next(_resource_versions))},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def _wants_table(request: Any) -> bool:
    accept = (request.headers or {}).get("Accept", "") or (request.headers or {}).get("accept", "")
    return "as=Table" in accept


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator with the workarounds of the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.printer_columns: dict[str, list[dict]] = {}
        self.in_flight: set[int] = set()
        if FIXES:  # Fix 9
            (self.fallback**1)[enums.action.WATCH] << kmock.headers(
                {"Content-Type": "application/json"}
            ) << self._serve_watch

    async def __call__(self, raw_request: Any) -> Any:
        if FIXES and raw_request.path != "/" and raw_request.path.endswith("/"):  # Fix 3
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.with_path(raw_request.path.rstrip("/")))
        return await super().__call__(raw_request)

    async def _handle(self, request: Any) -> Any:
        self.in_flight.add(id(request))  # before any await: the request is in the history from here on
        try:
            return await self._handle_tracked(request)
        finally:
            self.in_flight.discard(id(request))
            if FIXES and len(self._requests) > 32:  # Fix 13
                self._requests[:] = [r for r in self._requests if id(r) in self.in_flight]

    async def _handle_tracked(self, request: Any) -> Any:
        is_create = (
            request.resource is not None
            and request.action == enums.action.CREATE
            and isinstance(request.data, dict)
        )
        is_update = (
            request.resource is not None
            and request.action == enums.action.UPDATE
            and request.name is not None
            and isinstance(request.data, dict)
        )
        if FIXES and is_create:
            metadata = request.data.setdefault("metadata", {})
            if not metadata.get("name") and metadata.get("generateName"):  # Fix 7
                metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
            metadata.setdefault("uid", str(uuid.uuid4()))  # Fix 11
            metadata.setdefault("creationTimestamp", _now())
            metadata["generation"] = 1
            if request.namespace and "namespace" not in metadata:
                metadata["namespace"] = request.namespace
            metadata["resourceVersion"] = str(next(_resource_versions))
        elif FIXES and is_update:
            metadata = request.data.setdefault("metadata", {})
            metadata["resourceVersion"] = str(next(_resource_versions))
            if "spec" in request.data and request.subresource is None:
                stored = self._stored(request)
                if stored is not None and stored.get("spec") != _merged(stored.get("spec"), request.data["spec"]):
                    metadata["generation"] = int((stored.get("metadata") or {}).get("generation") or 1) + 1
        if FIXES and is_create and request.resource.plural == "customresourcedefinitions":
            self.register_crd(request.data)  # Fix 10
        response = await super()._handle(request)
        if FIXES and is_create and response.status == 200 and not response.prepared:
            response.set_status(201)  # Fix 4
        return response

    def _stored(self, request: Any) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    def register_crd(self, crd: dict) -> None:
        """Make a CRD's kind discoverable and remember its printer columns (fixes 10 and 12)."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        for version in spec.get("versions") or []:
            key = f"{spec.get('group')}/{version.get('name')}/{names.get('plural')}"
            self.resources[key] = kmock.ResourceInfo(
                kind=names.get("kind"),
                singular=names.get("singular"),
                namespaced=spec.get("scope") == "Namespaced",
                shortnames=set(names.get("shortNames") or []),
                categories=set(names.get("categories") or []),
                subresources=set((version.get("subresources") or {}).keys()),
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
            )
            self.printer_columns[key] = list(version.get("additionalPrinterColumns") or [])

    def _columns_for(self, resource: Any) -> list[dict] | None:
        return self.printer_columns.get(f"{resource.group}/{resource.version}/{resource.plural}")

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        if FIXES and payload.get("groupVersion", "").startswith("/"):  # Fix 5
            payload["groupVersion"] = payload["groupVersion"][1:]
        return payload

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        if not FIXES:
            return payload
        resource = request.resource
        info = self.resources[resource] if resource in self.resources else None  # noqa: SIM401 - explicit membership on KMock's array
        payload["apiVersion"] = f"{resource.group}/{resource.version}" if resource.group else resource.version
        payload["kind"] = (info.kind if info and info.kind else resource.plural.capitalize()) + "List"  # Fix 8
        selector = request.params.get("labelSelector")  # Fix 6
        if selector:
            payload["items"] = [
                item
                for item in payload["items"]
                if label_selector_matches((item.get("metadata") or {}).get("labels") or {}, selector)
            ]
        if _wants_table(request):  # Fix 12
            return render_table(payload["items"], self._columns_for(resource))
        return payload

    async def _serve_fetch(self, request: Any) -> Any:
        payload = await super()._serve_fetch(request)
        if FIXES and _wants_table(request):
            return render_table([payload], self._columns_for(request.resource))
        return payload


def _merged(old: Any, patch: Any) -> Any:
    """A JSON merge patch applied to a copy (to tell whether a spec really changed)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merged(result.get(key), value)
    return result


async def serve(port: int, *, register_jest_crd: bool) -> None:
    """Serve until SIGTERM/SIGINT; prints ``KMOCK_URL=...`` when ready."""
    async with Emulator() as emulator, kmock.Server(emulator, host="127.0.0.1", port=port) as server:
        emulator.resources.load_bundled()
        if register_jest_crd:
            emulator.resources["jest.training/v1alpha1/jesttrainingjobs"] = kmock.ResourceInfo(
                kind="JESTTrainingJob",
                singular="jesttrainingjob",
                namespaced=True,
                shortnames={"jtj", "jestjob"},
                categories={"jest"},
                subresources={"status"},
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
            )
        emulator.objects["v1/namespaces", None, "default"] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "uid": str(uuid.uuid4())},
        }
        print(f"KMOCK_URL={server.url}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``emulator.py --port PORT [--no-fixes] [--no-crd]``."""
    global FIXES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-fixes", action="store_true", help="serve bare KMock 0.8")
    parser.add_argument("--no-crd", action="store_true", help="jest.training is discoverable only after a CRD")
    args = parser.parse_args(argv)
    FIXES = not args.no_fixes
    if FIXES:
        install_parser_fixes()
    asyncio.run(serve(args.port, register_jest_crd=not args.no_crd and FIXES))


if __name__ == "__main__":
    main()
