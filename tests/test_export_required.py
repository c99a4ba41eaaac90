"""A capability the build is asked for and cannot deliver fails the build (issue 10 item 7): the kv
graph unless --no-kv-graph, and the rotary fusion the decode speed depends on. Nothing is written
to --out and no staging folder stays. The embedded demo model is the checkpoint (in the repository).
"""
from __future__ import annotations

import pytest

from export.build import build
from export.errors import ExportError
from reference.data import DEMO_MODEL_DIR
from runtime.interface import KV_MODEL_FILE, MODEL_FILE


def leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_kv_graph_that_cannot_be_built_fails_and_names_the_opt_out(tmp_path, monkeypatch):
    import graphs.gqa

    def refuse(*a, **k):
        raise graphs.gqa.GQAError("head_size 8 is not a multiple of 16")

    monkeypatch.setattr(graphs.gqa, "to_gqa", refuse)
    out = tmp_path / "art"
    with pytest.raises(ExportError) as err:
        build(DEMO_MODEL_DIR, out, lift_mode="arith", verify=False, log=lambda m: None)
    msg = str(err.value)
    assert KV_MODEL_FILE in msg and "head_size 8" in msg and "--no-kv-graph" in msg
    assert not out.exists() and leftovers(out) == []
    # the opt-out builds without it, and the manifest says why
    folder = build(DEMO_MODEL_DIR, out, lift_mode="arith", verify=False, kv_graph=False, log=lambda m: None)
    assert (folder / MODEL_FILE).is_file() and not (folder / KV_MODEL_FILE).exists()


def test_fp16_with_the_kv_graph_is_refused_before_any_work(tmp_path):
    with pytest.raises(ExportError, match="--no-kv-graph"):
        build(DEMO_MODEL_DIR, tmp_path / "art", precision="fp16", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_rotary_fusion_that_matches_nothing_fails(tmp_path, monkeypatch):
    import graphs.optimize
    from export.graph import export_graph, load_reference
    from export.progress import Stages

    lm = load_reference(DEMO_MODEL_DIR, None, {})
    assert lm.cfg.rope_pairing == "rotate_half"
    monkeypatch.setattr(graphs.optimize, "fuse_rotary", lambda *a, **k: 0)  # as if the traced pattern changed
    with pytest.raises(ExportError, match=f"matched 0 of the {2 * lm.cfg.num_hidden_layers} rotate-half"):
        export_graph(lm, tmp_path / "work", "arith", 21, Stages(lambda m: None))
