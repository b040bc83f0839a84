"""The pipeline's seams on the tiny checkpoint: the event stream (order, cancel by closing), the Stepper's passes and
blocks policy, each model loaded once (editing under staged memory too), and components shared across threads."""

import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_glm_image.pipeline import GlmImagePipeline
from mlx_glm_image.pipeline.denoise import DenoiseInputs, Stepper, every_block
from mlx_glm_image.pipeline.flow import FlowMatchEulerSampler

MODELS = ("vision_language_encoder", "text_encoder", "transformer", "vae")
# --top-k 1: the random tiny AR model would otherwise sample its end token before the grid is complete
CALL = dict(prompt='a red cat "big"', height=64, width=96, num_inference_steps=3, seed=3, top_k=1, output_type="np")


@pytest.fixture
def reads(monkeypatch):
    """Every weight folder read, by component name."""
    import mlx_glm_image.loading as loading

    seen = []
    real = loading.load_weights
    monkeypatch.setattr(loading, "load_weights", lambda f: seen.append(Path(f).name) or real(f))
    return seen


def test_events_in_order_and_equal_to_the_call(model_dir):
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    events = list(pipe.stream(**CALL))
    kinds = [(e.kind, e.stage, e.done) for e in events if e.kind == "stage"]
    assert kinds == [("stage", s, d) for s in ("prior", "glyphs", "denoise", "decode") for d in (False, True)]
    tokens = [e for e in events if e.kind == "token"]
    steps = [e for e in events if e.kind == "step"]
    images = [e for e in events if e.kind == "image"]
    # 64x96: a 2x3 target grid and a 13x19 preview grid, then the end token
    assert [e.index for e in tokens] == list(range(2 * 3 + 13 * 19 + 1)) and tokens[0].total == len(tokens)
    assert [(e.index, e.total) for e in steps] == [(0, 3), (1, 3), (2, 3)]
    assert len(images) == 1 and images[0].seed == 3 and images[0].metadata["seed"] == 3
    assert images[0].metadata["steps"] == 3 and images[0].metadata["top_k"] == 1
    order = [e.kind for e in events]
    assert order.index("token") < order.index("step") < order.index("image")
    assert np.array_equal(images[0].image, pipe(**CALL).images[0]), "the stream gives the call's image"


@pytest.mark.parametrize("stop_at", ["token", "step"])
def test_closing_the_stream_stops_and_frees_staged_memory(model_dir, reads, stop_at):
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="staged")
    events = pipe.stream(**CALL)
    seen = []
    for event in events:
        seen.append(event.kind)
        if event.kind == stop_at:
            break
    events.close()
    assert seen.count(stop_at) == 1 and "image" not in seen
    assert not [n for n in MODELS if pipe.components.holds(n)], "closing frees what staged memory loaded"
    if stop_at == "token":
        assert reads == ["vision_language_encoder"], "closed during the AR stage: the DiT never loads"
    with pytest.raises(StopIteration):
        next(events)
    again = pipe(**CALL).images[0]  # the next call works normally
    fresh = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")(**CALL).images[0]
    assert np.array_equal(again, fresh)


def test_editing_under_staged_memory_loads_each_model_once(model_dir, reads, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(source)
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="staged")
    out = pipe(**dict(CALL, image=str(source)))
    assert sorted(reads) == sorted(MODELS) and pipe.loads == 4, reads
    assert not [n for n in MODELS if pipe.components.holds(n)]
    resident = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    assert np.array_equal(out.images, resident(**dict(CALL, image=Image.open(source))).images)


def test_a_model_is_loaded_once_by_threads_asking_together(model_dir, reads):
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    got, start = [], threading.Barrier(4)

    def ask():
        start.wait()
        got.append(pipe.transformer)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == ["transformer"] and all(m is got[0] for m in got)


def test_checks_on_another_thread_while_staged_memory_loads_and_frees(model_dir):
    """The server checks requests on its event loop while its worker generates: the components and the facts
    are shared under one lock, so neither side sees them half-changed."""
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="staged")
    stop, errors, checked = threading.Event(), [], []

    def check():
        while not stop.is_set():
            try:
                checked.append(pipe.request(prompt="x", height=64, width=64, seed=1).height)
                pipe.components.missing()
                pipe.components.quantization()
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(e)

    thread = threading.Thread(target=check)
    thread.start()
    try:
        for seed in range(3):
            pipe(**dict(CALL, seed=seed))
    finally:
        stop.set()
        thread.join()
    assert not errors and checked


def test_stepper_passes_and_a_blocks_policy_decides(model_dir):
    """Each step runs one DiT pass per Pass (cond, uncond); the blocks policy sees every (pass, step), keeps its own
    state by pass name, and may compute the blocks itself: running them in two halves is the plain computation."""
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    dit = pipe.transformer
    b, n = 1, 4 * 6
    rng = np.random.default_rng(0)
    text = mx.array(rng.standard_normal((b, 3, dit.config.text_embed_dim)).astype(np.float32))
    inputs = DenoiseInputs(prompt_embeds=text, negative_prompt_embeds=mx.zeros_like(text),
                           prior_token_ids=mx.array(rng.integers(0, 40, (b, n)), dtype=mx.int32),
                           target_size=mx.array([[64.0, 96.0]]), crop_coords=mx.zeros((1, 2)), guidance_scale=2.0)
    latents = mx.array(rng.standard_normal((b, dit.config.in_channels, 8, 12)).astype(np.float32))
    sampler = FlowMatchEulerSampler(pipe.scheduler, image_seq_len=n, num_inference_steps=3)
    plain = [x for _, x in Stepper(dit, sampler, inputs).steps(latents)][-1]

    seen, state = [], {}

    def halves(pass_, step, x, blocks):
        """Asks the host for a value in between (a generator policy): the passes take turns around it."""
        state[pass_.name] = state.get(pass_.name, 0) + 1
        seen.append((pass_.name, step, "first half"))
        h = blocks(0, blocks.n_blocks // 2, x)
        yield mx.mean(h)
        seen.append((pass_.name, step, "second half"))
        return blocks(blocks.n_blocks // 2, blocks.n_blocks, h)

    stepper = Stepper(dit, sampler, inputs, blocks=halves)
    split = [x for _, x in stepper.steps(latents)][-1]
    assert np.array_equal(np.array(split), np.array(plain))
    assert seen == [(p, s, half) for s in range(3) for half in ("first half", "second half") for p in ("cond", "uncond")]
    assert [state[p.name] for p in stepper.passes] == [3, 3]
    assert (stepper.computed, stepper.total) == (2 * 2, 2 * 2), "two passes of the tiny DiT's 2 blocks"
    assert np.array_equal(np.array([x for _, x in Stepper(dit, sampler, inputs, blocks=every_block).steps(latents)][-1]),
                          np.array(plain)), "every_block is the default"

    skipped = Stepper(dit, sampler, inputs, blocks=lambda p, s, x, blocks: blocks(0, blocks.n_blocks - 1, x))
    assert np.abs(np.array([x for _, x in skipped.steps(latents)][-1]) - np.array(plain)).max() > 1e-4, \
        "a policy that skips a block changes the result"
    assert (skipped.computed, skipped.total) == (2, 4)


def test_previews_come_spread_over_the_steps_and_change_nothing(model_dir, reads):
    """Preview events at steps spread over the run (the predicted clean image, decoded small); the final image is
    the same as without them, and staged memory loads the VAE once for both."""
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="staged")
    call = dict(CALL, num_inference_steps=6)
    events = list(pipe.stream(**call, previews=3))
    previews = [e for e in events if e.kind == "preview"]
    assert [(e.index, e.total, e.step) for e in previews] == [(0, 3, 1), (1, 3, 2), (2, 3, 3)]
    steps = [e.index for e in events if e.kind in ("step", "preview") for _ in [0] if e.kind == "step"]
    order = [(e.kind, e.step if e.kind == "preview" else e.index) for e in events if e.kind in ("step", "preview")]
    assert order.index(("preview", 1)) == order.index(("step", 1)) + 1, "a preview follows its step"
    assert all(e.image.size == (96, 64) for e in previews) and steps == list(range(6))
    first, last = np.asarray(previews[0].image, np.float32), np.asarray(previews[-1].image, np.float32)
    image = next(e for e in events if e.kind == "image").image
    assert np.abs(last - image * 255).mean() < np.abs(first - image * 255).mean(), "later previews are nearer the image"
    assert sorted(reads) == sorted(MODELS), "the VAE is loaded once, for the previews and the decode"
    assert np.array_equal(image, pipe(**call).images[0]), "previews change nothing"


@pytest.mark.parametrize("stop_at", ["condition", "prefill"])
def test_closing_while_the_prompt_is_read_stops_there(model_dir, monkeypatch, stop_at):
    """A long prompt's prefill and the condition images' vision encoding come in parts, each with its event: a
    stream closed at one runs no further part (a client that left once held the server for a whole prefill)."""
    from mlx_glm_image.models.ar.model import GlmImageForConditionalGeneration as ArModel
    from mlx_glm_image.pipeline import prior_tokens

    monkeypatch.setattr(prior_tokens, "PREFILL_CHUNK", 16)
    ran = []
    features, forward = ArModel.get_image_features, ArModel.__call__
    monkeypatch.setattr(ArModel, "get_image_features", lambda self, *a: ran.append("image") or features(self, *a))
    monkeypatch.setattr(ArModel, "__call__", lambda self, *a, **k: ran.append("chunk") or forward(self, *a, **k))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    call = dict(CALL, prompt="a red cat " * 20, image=[image, image])
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32", memory="resident")
    length = pipe.processor.apply_chat_template([[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "image", "image": image},
        {"type": "text", "text": call["prompt"]}]}]], target_h=64, target_w=96)["input_ids"].shape[1]
    chunks = -(-length // 16)

    everything = [(e.kind, e.stage, e.index, e.total) for e in pipe.stream(**call) if e.kind in ("condition", "prefill")]
    assert everything == ([("condition", "prior", i, 2) for i in range(2)] + [("prefill", "prior", i, chunks)
                                                                               for i in range(chunks - 1)]
                          + [("condition", "denoise", i, 2) for i in range(2)]), "the last chunk comes with a token"
    ran.clear()
    events = pipe.stream(**call)
    for event in events:
        if event.kind == stop_at:
            break
    events.close()
    assert ran == (["image"] if stop_at == "condition" else ["image", "image", "chunk"]), ran
