"""Find annotator weights: a local folder laid out like ``lllyasviel/Annotators``, or a hub id.

No machine here reaches a model hub, so the local folder is the normal case: ``--weights-dir DIR``
or ``CONTROLFORGE_WEIGHTS=DIR``. A missing file fails before any work, naming the file, the
folder searched and where to download it.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "CONTROLFORGE_WEIGHTS"
ANNOTATORS_REPO = "lllyasviel/Annotators"


class MissingWeightsError(FileNotFoundError):
    """A weight file or model folder an annotator needs is not where it was looked for."""


def weights_source(explicit: str | None = None) -> str | None:
    """The folder (or hub id) to load weights from: the flag, else the environment variable."""
    return explicit or os.environ.get(WEIGHTS_ENV) or None


def _download_hint(filename: str, repo: str) -> str:
    return f"download it from https://huggingface.co/{repo}/blob/main/{filename}"


def locate_file(source: str | None, filename: str, annotator: str, repo: str = ANNOTATORS_REPO) -> str:
    """Local path of ``filename`` for ``annotator``; downloads only when ``source`` is a hub id."""
    if source is None:
        raise MissingWeightsError(
            f"annotator {annotator!r} needs the weight file {filename}: pass --weights-dir DIR or set "
            f"{WEIGHTS_ENV}=DIR, a folder laid out like {repo} holding it ({_download_hint(filename, repo)})"
        )
    if os.path.isdir(source):
        path = Path(source) / filename
        if not path.is_file():
            raise MissingWeightsError(
                f"annotator {annotator!r} needs {filename}, which is not in {source}; "
                f"{_download_hint(filename, repo)} into that folder"
            )
        return str(path)
    if os.path.sep in source or source.startswith("."):
        raise MissingWeightsError(f"weights folder {source} does not exist (annotator {annotator!r})")
    return _hub_download(source, filename, annotator)


def locate_model_dir(source: str | None, model: str, annotator: str) -> str:
    """A transformers model folder: ``model`` as a path, as a sub-folder of ``source``, or a hub id."""
    candidates = [Path(model)] + ([Path(source) / model] if source and os.path.isdir(source) else [])
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return str(candidate)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in model or model.startswith((".", "/")):
        raise MissingWeightsError(
            f"annotator {annotator!r} needs the model folder {model!r} (with config.json and weights); "
            f"looked in {', '.join(str(c) for c in candidates)}. Save one with "
            f"`transformers` `save_pretrained` (or download https://huggingface.co/{model}) into "
            f"--weights-dir, or pass its path as the annotator's model parameter"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model)
    except Exception as exc:
        raise MissingWeightsError(f"annotator {annotator!r}: cannot fetch {model} from the hub ({exc})") from exc


def _hub_download(repo: str, filename: str, annotator: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:
        raise MissingWeightsError(
            f"annotator {annotator!r}: cannot fetch {filename} from hub repo {repo} ({type(exc).__name__}); "
            f"offline, pass --weights-dir DIR with the file instead ({_download_hint(filename, repo)})"
        ) from exc


def weight_files(path: str) -> list[str]:
    """The weight files of a model folder (or the file itself), for provenance hashes."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    suffixes = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".tflite"}
    return sorted(str(f) for f in p.rglob("*") if f.suffix in suffixes)
