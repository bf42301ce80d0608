"""Export's files: an existing export is kept unless --overwrite, each export gets its own Modelfile, and
temporary files are new files at random names (a planted symlink is never followed)."""
from __future__ import annotations

import pytest

from lorafit.errors import UserError


def test_existing_export_needs_overwrite(tiny_model_dir, tmp_path):
    from lorafit.export.gguf import export_gguf

    folder = tiny_model_dir("llama")
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, "f16")
    before = out.read_bytes()
    with pytest.raises(UserError, match="already exists") as e:
        export_gguf(folder, out, "q8_0")
    assert "--overwrite" in e.value.fix and out.read_bytes() == before
    out.unlink()
    with pytest.raises(UserError, match=r"m\.Modelfile' already exists"):  # its Modelfile alone counts too
        export_gguf(folder, out, "q8_0")
    export_gguf(folder, out, "q8_0", overwrite=True)
    assert out.read_bytes() != before
    export_gguf(folder, tmp_path / "other.gguf", "f16")  # a second export in the folder gets its own Modelfile
    assert "FROM ./m.gguf" in (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./other.gguf" in (tmp_path / "other.Modelfile").read_text()


def test_planted_symlinks_are_not_followed(tiny_model_dir, tmp_path):
    """Links at the names a careless writer would use (`x.gguf.tmp`, `x.Modelfile.tmp`) stay untouched, and so
    does what they point to."""
    from lorafit.export.gguf import export_gguf

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in ("x.gguf.tmp", "x.Modelfile.tmp", "Modelfile.tmp", "Modelfile"):
        (out_dir / name).symlink_to(victim)
    export_gguf(tiny_model_dir("llama"), out_dir / "x.gguf", "f16")
    assert victim.read_text() == "precious"
    assert all((out_dir / n).is_symlink() for n in ("x.gguf.tmp", "x.Modelfile.tmp", "Modelfile.tmp", "Modelfile"))
    assert (out_dir / "x.gguf").read_bytes()[:4] == b"GGUF" and not (out_dir / "x.gguf").is_symlink()
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
