"""Checkpoints: atomic writes, checksums, corrupt ones skipped, full disks, pruning, exact resume (in process)."""
from __future__ import annotations

import errno
import json
import logging
import shutil

import pytest
from helpers import alpaca_file, assert_same_adapter, cli_main, losses, run_train, train_args


@pytest.fixture(scope="module")
def four_steps(tiny_model_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (kept as the reference, never modified)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), out, max_steps=4, save_strategy="steps",
                           save_steps=2, eval_strategy="steps", eval_steps=2))
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_contents_verify(four_steps):
    from lorafit.train.checkpoint import MANIFEST, list_checkpoints, verify

    ckpts = list_checkpoints(four_steps)
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"]
    for p in ckpts:
        assert verify(p) is None
        files = json.loads((p / MANIFEST).read_text())["files"]
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng.pt",
                "trainer_state.json"} <= set(files)
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["items_in_epoch"] == 8 and state["world_size"] == 1
    assert state["best_val"] is not None


def test_corrupt_checkpoint_is_skipped_and_resume_is_exact(four_steps, tmp_path, caplog):
    """Flip bytes in step 4's weights: resume reports it, restarts from step 2 and reproduces steps 3-4 exactly."""

    run = _copy(four_steps, tmp_path / "run")
    weights = run / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20:] = bytes(20)
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        assert cli_main(["train", "--output_dir", str(run), "--resume"]) == 0
    assert "step-000004 is damaged (adapter_model.safetensors does not match its checksum)" in caplog.text
    assert losses(run) == pytest.approx(losses(four_steps), abs=1e-6)
    assert_same_adapter(run, four_steps)


def test_verify_catches_partial_and_truncated(four_steps, tmp_path):
    from lorafit.train.checkpoint import latest_good, verify

    run = _copy(four_steps, tmp_path / "run")
    c4 = run / "checkpoints" / "step-000004"
    (c4 / "optimizer.pt").write_bytes((c4 / "optimizer.pt").read_bytes()[:100])
    assert "optimizer.pt has 100 bytes" in verify(c4)
    (c4 / "manifest.json").unlink()
    assert "manifest.json is missing" in verify(c4)
    path, state = latest_good(run)
    assert path.name == "step-000002" and state["step"] == 2
    (run / "checkpoints" / "step-000002" / "rng.pt").unlink()
    assert latest_good(run) is None


def test_disk_full_mid_save_keeps_earlier_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC while writing step 4: a clear message, step 2 whole, no half-written folder left."""
    import lorafit.train.checkpoint as C
    from lorafit.errors import UserError

    real = C._torch_save

    def full_disk(obj, path):
        if "step-000004" in str(path):
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(C, "_torch_save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), out, max_steps=5, save_strategy="steps",
                               save_steps=2))
    msg = str(e.value)
    assert "no space left on the device" in msg and "step-000002" in msg and "--resume" in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert C.verify(out / "checkpoints" / "step-000002") is None
    assert not (out / "adapter_model.safetensors").exists()


def test_free_space_checked_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import lorafit.train.checkpoint as C
    from lorafit.errors import UserError

    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * 2**20, 10 * 2**20, 2**20))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"not enough disk space .* MiB are free") as e:
        run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), out, save_strategy="steps", save_steps=1))
    assert "save_total_limit" in str(e.value)
    assert not out.exists()  # nothing was written


def test_partial_folders_are_cleaned_and_pruning_keeps_newest(tmp_path):
    from lorafit.train.checkpoint import clean_partial, list_checkpoints

    root = tmp_path / "checkpoints"
    for name in (".tmp-step-000006", ".trash-step-000001-1", "step-000002", "step-000010", "notes"):
        (root / name).mkdir(parents=True)
    clean_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000002", "step-000010"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000010"]


def test_unfinished_run_needs_resume_or_overwrite(four_steps, tmp_path):
    from lorafit.config.load import build_config
    from lorafit.errors import UserError
    from lorafit.run_dir import load_run_config
    from lorafit.train.run_files import check_output_dir

    run = _copy(four_steps, tmp_path / "run")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    with pytest.raises(UserError, match="checkpoints of an unfinished run") as e:
        check_output_dir(build_config(None, {"output_dir": str(run)}), run)
    assert "--resume" in str(e.value)
    check_output_dir(load_run_config(run, {"resume": "true"}), run)  # how `train --resume` builds it


def test_resume_with_more_steps_follows_the_new_schedule(four_steps, tiny_model_dir, tmp_path, caplog):
    """--resume --max_steps 8 on a finished 4-step cosine run: steps 5-8 use a straight 8-step run's lr
    (the checkpoint's schedule ended at lr 0, which the first resumed step used to train with)."""
    from lorafit.train.log import read_metrics

    def lrs(run):
        return {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}

    run = _copy(four_steps, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="lorafit"):
        assert cli_main(["train", "--output_dir", str(run), "--resume", "--max_steps", "8"]) == 0
    straight = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "straight", max_steps=8))
    resumed, want = lrs(run), lrs(straight)
    assert sorted(resumed) == list(range(1, 9)) and resumed[5] > 0
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], rel=1e-9)
    assert "planned 4 steps, this one 8" in caplog.text  # said, not silently done


def test_resume_is_exact_on_the_fused_path_under_lora_dropout(tiny_model_dir, tmp_path):
    """The fused path's dropout masks hash a per-pass seed drawn from torch's CPU generator, whose state the
    checkpoint keeps: a run resumed from step 2 draws the same masks as the straight run, step for step."""
    straight = tmp_path / "straight"
    args = train_args(tiny_model_dir("llama"), alpaca_file(), straight, max_steps=4, save_strategy="steps",
                      save_steps=2, fast_kernels="on", lora_dropout=0.3, gradient_checkpointing="true")
    run_train(**args)
    run = _copy(straight, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert cli_main(["train", "--output_dir", str(run), "--resume"]) == 0
    assert losses(run) == pytest.approx(losses(straight), abs=1e-6)
    assert_same_adapter(run, straight)
