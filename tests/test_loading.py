"""The one loading rule (pipeline root + component, component folder, Hub repo id fetching only what is used),
and the pipeline on a Hub repo id: components fetched when first used, weights read once."""

import fnmatch
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_glm_image import GlmImagePipeline, GlmImageTransformer2DModel, load_model, loading


@pytest.fixture(scope="module")
def folder(diffusion_side):
    return diffusion_side[0]


@pytest.fixture
def fake_hub(folder, tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download over the local folder; records every pattern list asked."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns or ["*"]))
        cache = tmp_path / "hub-cache"
        for f in folder.rglob("*"):
            rel = f.relative_to(folder).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (cache / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, cache / rel)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_component_folder_rule(folder, fake_hub):
    assert loading.component_folder(folder, "transformer") == folder / "transformer"  # pipeline root
    assert loading.component_folder(folder / "vae", "vae") == folder / "vae"  # the component's own folder
    assert loading.component_folder(folder, "vae", subfolder="transformer") == folder / "transformer"
    assert loading.component_folder(folder, "scheduler") == folder / "scheduler"
    with pytest.raises(loading.WeightsError, match="has no vision_language_encoder/ folder"):
        loading.component_folder(folder, "vision_language_encoder")
    # a string that looks like a local path is never sent to the Hub, even when it has one slash
    for local in ("./org/name", "/nowhere/x", "~/x/y"):
        with pytest.raises(loading.WeightsError, match="does not exist"):
            loading.component_folder(local, "transformer")
    assert fake_hub == []
    hub = loading.component_folder("org/name", "transformer", files="*.json")
    assert fake_hub == [["transformer/*.json", "model_index.json"]]
    assert (hub / "config.json").is_file() and not list(hub.glob("*.safetensors"))


def test_load_model_everywhere(folder, fake_hub):
    a = load_model(GlmImageTransformer2DModel, folder)
    b = load_model(GlmImageTransformer2DModel, folder / "transformer")
    c = load_model(GlmImageTransformer2DModel, "org/name", subfolder="transformer")
    assert fake_hub == [["transformer/*", "model_index.json"]]
    x = dict(hidden_states=mx.ones((1, 4, 4, 4)), encoder_hidden_states=mx.ones((1, 2, 32)),
             prior_token_id=mx.zeros((4,), mx.int32), prior_token_drop=mx.zeros((4,), mx.bool_),
             timestep=mx.array([3.0]), target_size=mx.array([[32.0, 32.0]]), crop_coords=mx.zeros((1, 2)))
    outs = [np.array(m(**x).sample) for m in (a, b, c)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_pipeline_on_a_hub_id_fetches_components_when_used(fake_hub):
    pipe = GlmImagePipeline.from_pretrained("org/name", dtype="float32")
    assert all(p[0].endswith("/*.json") for p in fake_hub), "from_pretrained reads configs only"
    pipe("x", prior_token_ids=mx.zeros((1, 16), mx.int32), height=64, width=64, num_inference_steps=1, generator=0)
    fetched = {p[0] for p in fake_hub}
    assert {"transformer/*", "vae/*", "text_encoder/*", "scheduler/*"} <= fetched
    assert not any(p.startswith("vision_language_encoder/") and p.endswith("/*") for p in fetched), \
        "the AR model is not fetched when prior tokens are given"


def test_read_shares_reads_the_slices_a_tensor_split_asks_for(tmp_path):
    """Rows (with two segments, as gate_up) and columns, bf16 and packed uint32: the bytes of the share only."""
    from mlx_glm_image.loading import read_shares

    w = mx.random.normal((8, 12)).astype(mx.bfloat16)
    packed = mx.random.randint(0, 2**31, (6, 4)).astype(mx.uint32)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"a.weight": w, "b.weight": packed, "c": mx.zeros(3)})
    got = read_shares(tmp_path, {"a.weight": (0, ((1, 3), (5, 7))), "b.weight": (1, ((2, 4),))})
    assert got["a.weight"].dtype == mx.bfloat16
    assert mx.array_equal(got["a.weight"], mx.concatenate([w[1:3], w[5:7]]))
    assert mx.array_equal(got["b.weight"], packed[:, 2:4])
    with pytest.raises(loading.WeightsError, match="missing weights d"):
        read_shares(tmp_path, {"d": (0, ((0, 1),))})
