"""Drift: the smallest JSON merge patch that makes a live object carry what was rendered. Pure.

Desired manifests are compared as a subset of the live object, because the API server adds
defaults (a container's terminationMessagePath, a Service's clusterIP) that the operator never sets
and must not fight. Lists are compared element by element the same way and replaced whole when they
differ (merge patches cannot address list items). Maps the operator owns outright, such as a pod's
nodeSelector or a ConfigMap's data, are "exact": keys someone else added are removed. An exact
map inside list items (a container's resources: path element EACH) makes the list differ when an
item holds a key the manifest does not, so the list is replaced whole.
An empty list or map in the manifest matches a missing field, since the server omits empty ones.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

Path = tuple[str, ...]
EACH = "*"  # in a path: every item of a list

_MISSING = object()


def covers(live: Any, desired: Any, exact: Collection[Path] = (), path: Path = ()) -> bool:
    """Whether `live` holds everything `desired` says (extra keys and server defaults allowed, except
    in the maps at `exact` paths)."""
    if live is _MISSING or live is None:
        return desired is None or desired == [] or desired == {}
    if isinstance(desired, Mapping):
        return (
            isinstance(live, Mapping)
            and (path not in exact or live.keys() <= desired.keys())
            and all(covers(live.get(k, _MISSING), v, exact, (*path, k)) for k, v in desired.items())
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(covers(have, want, exact, (*path, EACH)) for have, want in zip(live, desired))
        )
    return bool(live == desired)


def merge_patch(
    live: Mapping[str, Any], desired: Mapping[str, Any], exact: Collection[Path] = (), path: Path = ()
) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that brings `live` to cover `desired`; {} when it already does."""
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = live.get(key, _MISSING)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = merge_patch(have, want, exact, (*path, key))
            if sub:
                patch[key] = sub
        elif not covers(have, want, exact, (*path, key)):
            patch[key] = want
    if path in exact:
        patch.update({key: None for key in live if key not in desired})
    return patch
