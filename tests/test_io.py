import pytest
import torch

from qdlib.io import atomic_dir, atomic_path, torch_load_safe, torch_save_atomic, write_json_atomic


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert p.read_text().strip().endswith("}") and '"v": 1' in p.read_text()
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(d) as tmp:
            (tmp / "a.txt").write_text("2")
            raise KeyboardInterrupt
    assert (d / "a.txt").read_text() == "1"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model"]


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    p = tmp_path / "ck.pt"
    torch_save_atomic({"w": torch.arange(3), "step": 7}, p)
    back = torch_load_safe(p)
    assert back["step"] == 7 and torch.equal(back["w"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        torch_load_safe(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        torch_load_safe(tmp_path / "bad.pt")


def test_unpickling_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(RuntimeError, match="could not be read"):
        torch_load_safe(p)
