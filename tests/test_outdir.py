"""--out never replaces or lands in the model it reads (factorlm.io.outdir), --overwrite or not."""

from __future__ import annotations

import pytest

from factorlm.cli import main
from factorlm.errors import ConfigError
from factorlm.io.outdir import check_out_apart
from helpers_cli import make_model_dir


def test_check_out_apart(tmp_path):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    gguf = tmp_path / "models" / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for out in (model, model / "sub", tmp_path / "models", tmp_path, model / ".." / "base"):
        with pytest.raises(ConfigError, match="input model"):
            check_out_apart(out, model)
    for out in (gguf, tmp_path / "models"):
        with pytest.raises(ConfigError, match="input model"):
            check_out_apart(out, gguf)
    check_out_apart(tmp_path / "models" / "base-0.2", model)  # a sibling is fine
    check_out_apart(tmp_path / "models" / "c", gguf)  # next to a GGUF file too
    check_out_apart(model, "org/some-hub-id")  # not a local path: nothing to protect


@pytest.mark.parametrize("overwrite", [False, True])
def test_compress_and_densify_refuse_to_write_into_their_input(tmp_path, capsys, overwrite):
    model = make_model_dir(tmp_path / "base", n_layers=1)
    before = sorted(p.name for p in model.iterdir())
    extra = ["--overwrite"] if overwrite else []
    for argv in (
        ["compress", str(model), "--out", str(model), *extra],
        ["compress", str(model), "--out", str(model / "small"), *extra],
        ["densify", str(model), "--out", str(model), *extra],
    ):
        capsys.readouterr()
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and "input model" in err and "\n" not in err
    assert sorted(p.name for p in model.iterdir()) == before
