"""Image helpers vs diffusers' VaeImageProcessor."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image

from mlx_glm_image.pipeline.image_processor import VaeImageProcessor

from diffusers.image_processor import VaeImageProcessor as RefProcessor  # noqa: E402

PROCESSOR = VaeImageProcessor()  # vae_scale_factor 8, as the pipeline builds it for the released VAE
preprocess, postprocess = PROCESSOR.preprocess, PROCESSOR.postprocess


def random_pil(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
@pytest.mark.parametrize("size", [(None, None), (64, 96), (70, 45)])
def test_preprocess_pil_equals_diffusers(mode, size):
    img = random_pil(83, 121, mode)
    ref = RefProcessor(vae_scale_factor=8, do_convert_rgb=True).preprocess(img, height=size[0], width=size[1])
    ours = preprocess(img, height=size[0], width=size[1])
    assert ours.dtype == mx.float32
    assert_close(ours, ref, tol=1e-6, what=f"preprocess {mode} {size}")
    assert ours.shape[2] % 8 == 0 and ours.shape[3] % 8 == 0


def test_preprocess_pil_list_and_scale_factor():
    imgs = [random_pil(50, 70, seed=s) for s in range(3)]
    ref = RefProcessor(vae_scale_factor=16, do_convert_rgb=True).preprocess(imgs, height=40, width=100)
    ours = VaeImageProcessor(vae_scale_factor=16).preprocess(imgs, height=40, width=100)
    assert ours.shape == (3, 3, 32, 96)
    assert_close(ours, ref, tol=1e-6)


@pytest.mark.parametrize("layout", ["HWC", "NHWC", "list"])
@pytest.mark.parametrize("size", [(None, None), (48, 40), (101, 67)])
def test_preprocess_numpy_equals_diffusers(layout, size):
    rng = np.random.default_rng(1)
    arr = rng.random((2, 37, 59, 3), dtype=np.float32)
    inp = {"HWC": arr[0], "NHWC": arr, "list": [arr[0], arr[1]]}[layout]
    ref = RefProcessor(vae_scale_factor=8).preprocess(inp, height=size[0], width=size[1])
    ours = preprocess(inp, height=size[0], width=size[1])
    assert_close(ours, ref, tol=1e-6, what=f"numpy {layout} {size}")


def test_preprocess_uint8_numpy_is_scaled():
    arr = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ref = RefProcessor().preprocess(arr.astype(np.float32) / 255.0)
    assert_close(preprocess(arr), ref, tol=1e-6)


@pytest.mark.parametrize("output_type", ["pil", "np"])
def test_postprocess_equals_diffusers(output_type):
    x = torch.randn(2, 3, 24, 40) * 0.8  # some values beyond [-1, 1] to exercise the clamp
    ref = RefProcessor().postprocess(x, output_type=output_type)
    ours = postprocess(mx.array(x.numpy()), output_type=output_type)
    if output_type == "pil":
        assert len(ours) == 2
        for a, b in zip(ours, ref):
            assert a.size == b.size and a.mode == b.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        assert_close(ours, ref, tol=1e-6)


def test_roundtrip():
    img = random_pil(32, 48)
    back = postprocess(preprocess(img))[0]
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        preprocess(Image.new("F", (32, 32)))
    with pytest.raises(ValueError, match="mode"):
        preprocess(Image.new("I;16", (32, 32)))
    with pytest.raises(ValueError, match="empty"):
        preprocess(random_pil(5, 40))
    with pytest.raises(ValueError, match="empty"):
        preprocess(random_pil(40, 40), height=4)
    with pytest.raises(ValueError, match="channels"):
        preprocess(np.zeros((16, 16, 4), np.float32))
    with pytest.raises(ValueError, match="not mixed"):
        preprocess([random_pil(16, 16), np.zeros((16, 16, 3), np.float32)])
    with pytest.raises(ValueError, match="share"):
        VaeImageProcessor(do_resize=False).preprocess([random_pil(16, 16), random_pil(16, 24)])
    with pytest.raises(ValueError, match="multiple"):
        VaeImageProcessor(do_resize=False).preprocess(random_pil(20, 16))
    with pytest.raises(ValueError):
        preprocess([])
    with pytest.raises(ValueError, match="shape"):
        postprocess(mx.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        postprocess(mx.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="output_type"):
        postprocess(mx.zeros((1, 3, 8, 8)), output_type="pt")
