"""A damaged file names itself: every load turns a missing, truncated or overwritten file into a QdError that names
the file and says how to get a good copy (each kind corrupted here, on a copy in a temporary folder)."""

import shutil

import pytest
import torch

from qdlib import DraftLoadError, KnowledgeCacheError, TeacherLoadError, load_draft, load_teacher, paths
from qdlib.errors import DamagedFileError, MissingFileError, QdError
from qdlib.feature_draft import load_feature_draft
from qdlib.io import how_to_restore, load_safetensors, read_json, torch_load_safe, torch_save_atomic
from qdlib.knowledge import load_knowledge_cache
from qdlib.memory_train import load_fusion

DAMAGES = ["truncated", "garbage", "empty"]


def damage(path, how: str) -> None:
    """Truncate ``path`` to half its size, overwrite it with text, or empty it."""
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not what was saved\n", "empty": b""}[how])


def damaged_copy(src, dst, name: str, how: str):
    """``src`` copied to ``dst`` with its file ``name`` damaged; returns ``(folder, damaged file)``."""
    shutil.copytree(src, dst)
    damage(dst / name, how)
    return dst, dst / name


def raises_naming(error, path, load):
    """``load()`` raises ``error`` (a QdError) whose message names ``path``; returns the message."""
    assert issubclass(error, QdError)
    with pytest.raises(error) as info:
        load()
    assert str(path) in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_damaged_teacher(tmp_path, name, how):
    folder, bad = damaged_copy(paths.TEACHER_DIR, tmp_path / "teacher", name, how)
    msg = raises_naming(TeacherLoadError, bad, lambda: load_teacher(str(folder)))
    assert "corrupt or truncated" in msg and "download the model again" in msg


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name, error", [("model.safetensors", DraftLoadError), ("config.json", DraftLoadError),
                                         ("knowledge_cache/cache.safetensors", KnowledgeCacheError),
                                         ("knowledge_cache/cache.json", KnowledgeCacheError)])
def test_a_damaged_reference_draft_or_its_cache(tmp_path, name, error, how):
    folder, bad = damaged_copy(paths.DRAFT_DIR, tmp_path / "draft", name, how)
    msg = raises_naming(error, bad, lambda: load_draft(folder))
    assert "export it again" in msg or "qd build-cache" in msg


def test_a_missing_weights_file_or_cache_file(tmp_path):
    folder = tmp_path / "draft"
    shutil.copytree(paths.DRAFT_DIR, folder)
    (folder / "knowledge_cache" / "cache.json").unlink()
    raises_naming(KnowledgeCacheError, folder / "knowledge_cache", lambda: load_knowledge_cache(folder / "knowledge_cache"))
    (folder / "model.safetensors").unlink()
    assert "does not exist" in raises_naming(DraftLoadError, folder / "model.safetensors", lambda: load_draft(folder))


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_damaged_feature_draft(tmp_path, name, how):
    folder, bad = damaged_copy(paths.FAST_DRAFT_DIR, tmp_path / "fast", name, how)
    raises_naming(DraftLoadError, bad, lambda: load_draft(folder))
    raises_naming(DamagedFileError, bad, lambda: load_feature_draft(folder))


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_or_memory_checkpoint(tmp_path, how):
    ck = tmp_path / "last.pt"
    torch_save_atomic({"fusion": {"w": torch.ones(3)}, "step": 4}, ck)
    damage(ck, how)
    msg = raises_naming(DamagedFileError, ck, lambda: torch_load_safe(ck))
    assert "delete it and rerun the command that wrote it" in msg
    raises_naming(DamagedFileError, ck, lambda: load_fusion(None, ck))  # a retrieval run's best.pt, the same way
    raises_naming(MissingFileError, tmp_path / "none.pt", lambda: torch_load_safe(tmp_path / "none.pt"))


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_safetensors_or_json_file(tmp_path, how):
    from safetensors.torch import save_file

    st, js = tmp_path / "w.safetensors", tmp_path / "m.json"
    save_file({"w": torch.ones(64, 64)}, str(st))
    js.write_text('{"a": [1, 2, 3]}')
    assert torch.equal(load_safetensors(st, fix="x")["w"], torch.ones(64, 64)) and read_json(js, what="m", fix="x")
    damage(st, how)
    damage(js, how)
    raises_naming(DamagedFileError, st, lambda: load_safetensors(st, fix="rerun it"))
    raises_naming(DamagedFileError, js, lambda: read_json(js, what="metrics", fix="rerun it"))


def test_a_committed_artifact_is_restored_with_git_and_a_run_file_by_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "REPO_DIR", tmp_path)
    monkeypatch.setenv("QD_RUNS", str(tmp_path / "outputs" / "runs"))
    folder, bad = damaged_copy(paths.DRAFT_DIR, tmp_path / "outputs" / "reference_draft", "model.safetensors",
                               "truncated")
    msg = raises_naming(DraftLoadError, bad, lambda: load_draft(folder))
    assert "`git checkout -- outputs/reference_draft/model.safetensors`" in msg
    run_file = tmp_path / "outputs" / "runs" / "distill" / "last.pt"
    assert how_to_restore(run_file, "rerun `qd distill`") == "rerun `qd distill`"
    assert how_to_restore(tmp_path / "elsewhere.pt", "rerun it") == "rerun it"
