"""upload: every artifact of the run to `<output_uri>`, then manifest.json listing them all.

Layout under the run's prefix:
    gguf/<name>-<quant>.gguf, gguf/<name>-<quant>.Modelfile
    adapter/...             (export.adapter)
    merged/...              (export.mergedSafetensors)
    loss-curve.png, dataset/report.json, eval/...
    checkpoints/step-.../   (written during training)
    manifest.json           (last: its presence means the upload is complete)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_api.status import Artifact, now_rfc3339

from ..paths import Workdir
from ..storage.s3 import S3Store, sha256_file

CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".md": "text/markdown",
                 ".Modelfile": "text/plain", ".jsonl": "application/jsonl"}


def collect(wd: Workdir, *, adapter: bool = True, merged: bool = False) -> list[tuple[Path, str, str, str | None]]:
    """(file, key relative to the run prefix, kind, quantization) for everything worth keeping."""
    items: list[tuple[Path, str, str, str | None]] = []
    if wd.gguf.exists():
        for p in sorted(wd.gguf.glob("*.gguf")):
            quant = p.stem.rsplit("-", 1)[-1]
            items.append((p, f"gguf/{p.name}", "gguf", quant))
        for p in sorted(wd.gguf.glob("*.Modelfile")):
            items.append((p, f"gguf/{p.name}", "modelfile", p.stem.rsplit("-", 1)[-1]))
    for flag, folder, kind in ((adapter, wd.adapter, "adapter"), (merged, wd.merged, "merged")):
        if flag and folder.exists():
            items += [(p, f"{kind}/{p.relative_to(folder).as_posix()}", kind, None)
                      for p in sorted(folder.rglob("*")) if p.is_file()]
    if wd.loss_plot.exists():
        items.append((wd.loss_plot, wd.loss_plot.name, "plot", None))
    report = wd.dataset / "report.json"
    if report.exists():
        items.append((report, "dataset/report.json", "dataset-report", None))
    if wd.eval.exists():
        items += [(p, f"eval/{p.relative_to(wd.eval).as_posix()}", "eval", None)
                  for p in sorted(wd.eval.rglob("*")) if p.is_file() and p.suffix in (".json", ".md")]
    return items


def upload(wd: Workdir, output_uri: str, store: S3Store, manifest_extra: dict[str, Any], *,
           adapter: bool = True, merged: bool = False, on_file=None) -> list[Artifact]:
    """Uploads the artifacts and the manifest; returns them all, manifest last."""
    base = output_uri if output_uri.endswith("/") else output_uri + "/"
    artifacts: list[Artifact] = []
    items = collect(wd, adapter=adapter, merged=merged)
    for n, (path, key, kind, quant) in enumerate(items, 1):
        if on_file:
            on_file(f"uploading {key} ({n}/{len(items)})")
        up = store.upload_file(path, base + key, CONTENT_TYPES.get(path.suffix))
        artifacts.append(Artifact(name=key, kind=kind, quantization=quant, uri=up.uri, size_bytes=up.size_bytes,
                                  sha256=up.sha256))
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "Manifest",
        "createdAt": now_rfc3339(), "outputUri": base,
        **manifest_extra,
        "artifacts": [a.wire() for a in artifacts],
    }
    wd.manifest.write_text(json.dumps(manifest, indent=2))
    up = store.upload_file(wd.manifest, base + "manifest.json", "application/json")
    artifacts.append(Artifact(name="manifest.json", kind="manifest", uri=up.uri, size_bytes=up.size_bytes,
                              sha256=sha256_file(wd.manifest)))
    return artifacts
