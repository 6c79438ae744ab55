"""Volumes of a local replica: each mountPath becomes a local directory, and the strings
of the container's command, args and env that start with a mountPath are rewritten to it.

PVCs (and hostPaths, which default to their own path) map through `mounts` ({mountPath or
claim name: local dir}), emptyDirs to a fresh directory per replica, configMaps to files
written from the ConfigMaps in the same YAML file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cnnflow.launch.validate import ManifestError


def volume_dirs(job: str, pod: dict[str, Any], container: dict[str, Any], home: Path,
                mounts: Mapping[str, str], config_maps: Mapping[str, Mapping[str, str]]
                ) -> dict[str, str]:
    """{mountPath: local dir} for the container's volume mounts (`home`: the replica's
    own directory, for emptyDirs and configMaps)."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    out = {}
    for vm in container.get("volumeMounts") or []:
        path, vol = vm["mountPath"], volumes.get(vm["name"])
        if vol is None:
            raise ManifestError(f"{job}: volumeMount {vm['name']!r} has no volume")
        if "persistentVolumeClaim" in vol or "hostPath" in vol:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            local = mounts.get(path) or (claim and mounts.get(claim))
            if not local and "hostPath" in vol:
                local = vol["hostPath"]["path"]
            if not local:
                raise ManifestError(
                    f"{job}: volume {vm['name']!r} (claim {claim}, mountPath {path}) "
                    f"has no local directory: map it with {path}=DIR")
        elif "emptyDir" in vol:
            local = str(home / vm["name"])
        elif "configMap" in vol:
            local = _config_map_dir(job, vol, home, config_maps)
        else:
            kind = next((k for k in vol if k != "name"), "?")
            raise ManifestError(f"{job}: volume {vm['name']!r}: {kind} volumes are "
                                "not supported locally (PVC, hostPath, emptyDir, configMap)")
        if vm.get("subPath"):
            local = str(Path(local) / vm["subPath"])
        Path(local).mkdir(parents=True, exist_ok=True)
        out[path] = local
    return out


def _config_map_dir(job: str, vol: dict[str, Any], home: Path,
                    config_maps: Mapping[str, Mapping[str, str]]) -> str:
    name = vol["configMap"]["name"]
    if name not in config_maps:
        raise ManifestError(f"{job}: configMap {name!r} (volume {vol['name']!r}) is "
                            "not in the job file")
    data = config_maps[name]
    items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
    target = home / f"configmap-{vol['name']}"
    for item in items:
        dest = target / item["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(data[item["key"]], encoding="utf-8")
    return str(target)


def rewriter(dirs: Mapping[str, str]) -> Callable[[str], str]:
    """A function rewriting each mountPath at the start of a word to its local dir."""
    if not dirs:
        return lambda s: s
    alts = "|".join(re.escape(p.rstrip("/")) for p in sorted(dirs, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=[=:,\s]))({alts})(?=/|$|[\s:,;])")
    table = {p.rstrip("/"): d for p, d in dirs.items()}
    return lambda s: pattern.sub(lambda mt: table[mt.group(1)], s)
