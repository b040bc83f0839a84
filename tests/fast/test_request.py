"""One request, made once from diffusers' call arguments: resolved, checked, frozen (no model, no torch)."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from facts import Facts
from PIL import Image

from mlx_glm_image.pipeline.request import Request, Sampling, Schedule
from mlx_glm_image.pipeline.sample_utils import greedy


def test_defaults_are_resolved_once():
    r = Request.from_call(Facts(), prompt="a cat")
    assert r.prompt == ("a cat",) and (r.height, r.width) == (1024, 1024) and r.image is None
    assert r.schedule == Schedule(num_inference_steps=50, guidance_scale=1.5) and r.schedule.guided
    assert r.sampling == Sampling(temperature=0.9, top_p=0.75, top_k=0), "GLM-Image's published settings"
    assert 0 <= r.seed < 2**31, "a random seed is chosen and kept, so the image can be made again"
    assert np.array_equal(np.array(r.generator), np.array(mx.random.key(r.seed)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.height = 512


def test_flat_arguments_go_to_their_parts():
    r = Request.from_call(Facts(), prompt=["a", "b"], num_inference_steps=7, guidance_scale=1.0, temperature=0.5,
                          top_k=3, height=512, width=768, num_images_per_prompt=2)
    assert r.schedule.num_inference_steps == 7 and not r.schedule.guided
    assert r.sampling == Sampling(temperature=0.5, top_p=0.75, top_k=3)
    assert (r.batch, r.num_images) == (2, 4) and (r.height, r.width) == (512, 768)


@pytest.mark.parametrize("config,want", [
    ({}, dict(temperature=0.9, top_p=0.75, top_k=0)),  # no generation_config.json: the published settings
    ({"temperature": 0.7, "top_p": 0.5}, dict(temperature=0.7, top_p=0.5, top_k=50)),  # transformers' for the rest
])
def test_sampling_defaults_from_the_checkpoint(config, want):
    """What the checkpoint's generation_config.json says, resolved once into the sampler the decode loop takes."""
    r = Request.from_call(Facts(generation_config=config), prompt="a cat")
    assert r.sampling == Sampling(**want) and r.sampling.sampler() is not greedy, "it samples"
    r = Request.from_call(Facts(generation_config=config), prompt="a cat", temperature=0.3, top_k=5)
    assert (r.sampling.temperature, r.sampling.top_k) == (0.3, 5)


def test_generator_and_seed():
    assert Request.from_call(Facts(), prompt="x", generator=5).seed == 5
    assert Request.from_call(Facts(), prompt="x", seed=6).seed == 6
    key = mx.random.key(9)
    by_key = Request.from_call(Facts(), prompt="x", generator=key)
    assert by_key.seed is None and by_key.generator is key


def test_an_unknown_argument_is_named():
    with pytest.raises(TypeError, match="unexpected argument 'steps'"):
        Request.from_call(Facts(), prompt="x", steps=3)


@pytest.mark.parametrize("arguments,message", [
    (dict(num_inference_steps=0), "steps must be an integer from 1 to 1000, got 0"),
    (dict(num_inference_steps=2.5), "steps must be an integer from 1 to 1000, got 2.5"),
    (dict(guidance_scale=float("inf")), "guidance must be a number from 0 to 100, got inf"),
    (dict(guidance_scale=-1), "guidance must be a number from 0 to 100, got -1"),
    (dict(temperature=0), "temperature must be a finite number > 0, got 0"),
    (dict(top_p=1.5), "top-p must be in (0, 1], got 1.5"),
    (dict(top_k=-1), "top-k must be an integer >= 0 (0: off), got -1"),
    (dict(seed=-1), "seed must be an integer from 0 to 2**64 - 1, got -1"),
    (dict(seed="7"), "seed must be an integer from 0 to 2**64 - 1, got '7'"),
    (dict(generator=2**64), "seed must be an integer from 0 to 2**64 - 1"),
    (dict(height=100), "multiples of 32, got 1024x100"),
    (dict(height=0), "positive multiples of 32, got 1024x0 (width x height)"),
    (dict(height=4096, width=4096), "at most 2048 pixels each"),
    (dict(height="64"), "height and width must be integers, got '64'"),
    (dict(prompt=123), "the prompt must be text, got int"),
    (dict(prompt=None), "Provide either `prompt` or `prompt_embeds`"),
    (dict(output_type="jpeg"), "output_type must be"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be at least 1"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(sampler="heun"), "sampler must be one of euler, got 'heun'"),
    (dict(sampler=["euler"]), "sampler must be one of euler, got ['euler']"),
])
def test_bad_arguments_are_one_line(arguments, message):
    with pytest.raises(ValueError) as caught:
        Request.from_call(Facts(), **{"prompt": "x", **arguments})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_condition_images_from_paths(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(path)
    facts = Facts()
    r = Request.from_call(facts, prompt="make it red", image=str(path))
    assert r.image_files == (str(path),) and len(r.image) == 1 and r.image[0][0].size == (200, 100)
    assert (r.height, r.width) == (96, 192), "the first condition image's size, rounded down to 32"
    assert len(facts.fitted) == 1, "fitted once to what the AR model's vision encoder takes"
    with pytest.raises(ValueError, match="does not exist"):
        Request.from_call(Facts(), prompt="x", image=str(tmp_path / "none.png"))


def test_the_glyph_tokens_of_a_prompt_are_bounded():
    """Each quoted string is truncated to max_sequence_length (diffusers); all of them together are bounded too,
    since the DiT attends over them and the image's tokens at once (before: 20,000 quoted strings reached it)."""
    from mlx_glm_image.pipeline.glyphs import glyph_tokens

    assert glyph_tokens('a sign "hi"') == 3  # h, i, eos
    assert glyph_tokens('"hi" and "yo"') == 8  # an even number of strings: a pad in front of each
    assert glyph_tokens("no quotes") == 1  # the empty string's eos
    assert glyph_tokens('"' + "x" * 5000 + '"') == 2048  # truncated per string
    Request.from_call(Facts(), prompt='"' + "x" * 5000 + '"')
    with pytest.raises(ValueError, match=r"quoted text is too long: 4000 glyph tokens in all, at most 2048 \(max_"):
        Request.from_call(Facts(), prompt='"ab" ' * 1000)
    Request.from_call(Facts(), prompt='"ab" ' * 1000, max_sequence_length=4000)
    with pytest.raises(ValueError, match="max_sequence_length must be an integer >= 1, got 0"):
        Request.from_call(Facts(), prompt="x", max_sequence_length=0)
