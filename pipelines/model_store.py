"""Model artifacts on local disk or S3 (the format is `mga.artifact`'s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mga.artifact import CONFIG, INDEX, WEIGHTS, ArtifactError, unpack_alignment, unpack_artifact, verify_artifact
from mga.ata import AttentionTokenAlignment
from mga.model import MGAModel
from pipelines.storage import StorageError, resolve


def write_artifact(uri: str, files: dict[str, bytes]) -> None:
    """Write the artifact's files, the index last: a reader never sees a partial artifact as valid."""
    location = resolve(uri)
    for name in (WEIGHTS, CONFIG, INDEX):
        location.join(name).write_bytes(files[name])


def read_artifact_files(uri: str) -> dict[str, bytes]:
    location = resolve(uri)
    if not location.join(INDEX).exists():
        raise StorageError(f"{location.uri} is not a model artifact: no {INDEX} (train writes one at the end of a run)")
    return {name: location.join(name).read_bytes() for name in (WEIGHTS, CONFIG, INDEX)}


def _one_line(read: Callable[..., Any], files: dict[str, bytes], where: str) -> Any:
    """`read(files, where=where)`, with whatever a corrupt or hostile artifact raises (safetensors,
    JSON, config errors) reported as an ArtifactError naming it: a one-line error, never a traceback."""
    try:
        return read(files, where=where)
    except ArtifactError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ArtifactError(f"{where}: not a loadable model artifact ({type(error).__name__}: {error})") from error


def load_artifact(files: dict[str, bytes], where: str) -> tuple[MGAModel, str, dict[str, Any]]:
    """unpack_artifact, reported in one line (`where` names the artifact)."""
    return _one_line(unpack_artifact, files, where)


def load_model(uri: str) -> tuple[MGAModel, str, dict[str, Any]]:
    """(model, model_id, config) of the artifact at `uri`; the hash is checked, nothing is unpickled."""
    return load_artifact(read_artifact_files(uri), resolve(uri).uri)


def model_info(uri: str) -> tuple[str, dict[str, Any]]:
    """(model_id, config) of the artifact at `uri`, its hash checked, without building the model
    (a search's driver needs no weights: they held ~0.4 GB of its memory at the paper's backbone)."""
    return _one_line(verify_artifact, read_artifact_files(uri), resolve(uri).uri)


@dataclass(frozen=True)
class ModelSource:
    """The job's model as its Ray actors get it: where to read it, and which model it must be.

    An actor loads the model from storage in its constructor rather than taking the
    artifact's bytes from the object store: Ray restarts a dead actor (its node lost) with the
    same constructor arguments, and an object the driver put may be gone by then
    (ray-project/ray#53727: "Failed to retrieve object"). A URI is always there; `model_id`
    makes sure it still holds the model the job started with.
    """

    uri: str
    model_id: str

    def load(self) -> tuple[MGAModel, dict[str, Any]]:
        model, model_id, config = load_model(self.uri)
        self._check(model_id)
        return model, config

    def load_alignment(self) -> AttentionTokenAlignment:
        """The model's ATA head alone (mga.artifact.unpack_alignment): what a rerank runs."""
        alignment, _, model_id = _one_line(unpack_alignment, read_artifact_files(self.uri), resolve(self.uri).uri)
        self._check(model_id)
        return alignment

    def _check(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ArtifactError(f"{resolve(self.uri).uri} now holds model_id {model_id}, not {self.model_id} the job started with (replaced mid-job?): run the job again")


__all__ = ["ArtifactError", "ModelSource", "load_artifact", "load_model", "model_info", "read_artifact_files", "write_artifact"]
