"""``mlx-glm-image --check``: will this machine run the model? Answered before any weight is downloaded.

One screen (mflux has ``mflux-check``): MLX and its device; the memory budget that ``--memory auto`` decides by
(pipeline/components.py: ``memory_budget()``, of which the models may take ``RESIDENT_SHARE``); each model's
weights once loaded, as its files store them and with ``-q 8`` / ``-q 4``; which memory modes fit at each width
(resident: every model at once; staged: the largest stage); free disk against the download and against a
conversion's output; whether the Hugging Face Hub answers. Exit 0 when the model can run here, 1 with the reason.

The sizes come without a weight download: a local folder's safetensors headers, planned as the converter plans
(conversion.Plan / conversion.scan); a Hub repo's file listing (sizes only) with its small config.json files; or,
when the Hub does not answer, the released checkpoint's figures (``RELEASED``). A ``-q`` width is the bytes of the
layers the model's own predicate quantizes (quantize.quantizable_layers) at quantize.quantized_nbytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import loading
from . import quantize as Q
from .conversion import COPIED, ConvertError, Plan, check_free_space, human, scan
from .models import released
from .pipeline.components import COMPONENTS, MODELS, REQUIRED, RESIDENT_SHARE, memory_budget

WIDTHS = (None, 8, 4)  # the columns: None is the weights as their files store them (no -q)
MODES = ("resident", "staged")
HUB_TIMEOUT = 5.0  # seconds the Hub has to answer
# The released zai-org/GLM-Image when the Hub does not answer: each model's bytes are its parameter count at the
# released config (models/released.py, docs/checkpoint.md) times the bytes per value its files store. docs/checkpoint.md: about 36 GB, AR model ~20 GB, DiT ~14 GB, VAE ~0.8 GB, ByT5 ~0.9 GB (fp32).
RELEASED = {
    "vision_language_encoder": 10_114_245_632 * 2,  # bf16
    "text_encoder": 217_657_472 * 4,  # fp32
    "transformer": 6_926_882_880 * 2,  # bf16
    "vae": 406_100_643 * 2,  # bf16
}


# ---------------------------------------------------------------------------------------------------------
# The decision (pure: sizes and a budget in, a verdict out)


def stages() -> dict[str, list[str]]:
    """The models each stage holds in staged memory (COMPONENTS' stages). The VAE, the decode stage's model, is
    loaded while denoising already when a run edits an image or previews, and kept until the decode: the denoise
    stage may hold the DiT and the VAE."""
    held: dict[str, list[str]] = {}
    for c in COMPONENTS:
        if c.model is not None:
            held.setdefault(c.stage, []).append(c.name)
    held["denoise"] = held.get("denoise", []) + held.get("decode", [])
    return held


def peaks(loaded: dict[str, int]) -> dict[str, int]:
    """Bytes of weights held at once, per memory mode, for one width's per-model bytes."""
    return {"resident": sum(loaded.values()),
            "staged": max(sum(loaded.get(n, 0) for n in names) for names in stages().values())}


def allowed(budget: int) -> float:
    """What the models may take of the memory budget: --memory auto's rule (resident when the weights fit in it)."""
    return RESIDENT_SHARE * budget


def flags(width: int | None, mode: str) -> str:
    return " ".join(([f"-q {width}"] if width else []) + [f"--memory {mode}"])


@dataclass
class Facts:
    """What the check found; ``verdict`` decides from these alone."""

    model: str
    source: str  # where the sizes come from, one phrase
    budget: int  # bytes (memory_budget())
    weights: dict[str, dict] | None  # model -> {width: bytes once loaded}; None when no sizes are known
    bits: int | None = None  # -q as given
    memory: str = "auto"  # --memory as given
    converted: bool = False  # a converted folder: loaded as stored, whatever -q says
    download: int = 0  # bytes a run still fetches from the Hub
    download_dir: Path | None = None  # where they go (the Hub cache)
    download_free: int | None = None
    download_room: bool = True  # they fit there, with the converter's margin
    reachable: bool = True  # the download can start (the Hub answered), or there is none
    hub: str = ""  # the Hub's answer, one phrase
    conversions: list = field(default_factory=list)  # (bits, bytes, folder, free, fits, with the download)
    notes: list = field(default_factory=list)

    def widths(self) -> list:
        """The columns: no -q, -q 8, -q 4, and -q as given."""
        return list(WIDTHS) + ([self.bits] if self.bits not in WIDTHS else [])

    def options(self) -> list[tuple]:
        """(width, mode, bytes at once) a run as asked may use, the most precise first, resident before staged."""
        widths = [None] if self.converted else [self.bits] if self.bits else list(WIDTHS)
        modes = MODES if self.memory == "auto" else (self.memory,)
        return [(w, m, peaks({n: s[w] for n, s in self.weights.items()})[m]) for w in widths for m in modes]


def verdict(facts: Facts) -> tuple[int, str]:
    """(exit code, the reason in one line): 0 when some width and memory mode fits and the download (if any) can
    come and fits on its disk."""
    if facts.weights is None:
        return 1, (f"cannot tell: {facts.hub}, and {facts.model} is neither a local folder, in the Hub cache nor "
                   "the released checkpoint")
    limit = allowed(facts.budget)
    options = facts.options()
    fitting = [o for o in options if o[2] <= limit]
    if not fitting:
        w, m, need = min(options, key=lambda o: o[2])
        reason = (f"cannot run: the weights do not fit in memory; the smallest, {flags(w, m)}, holds {human(need)} "
                  f"at once and the models may take {human(limit)} ({RESIDENT_SHARE:.0%} of {human(facts.budget)})")
        unasked = [o for o in dataclasses.replace(facts, bits=None, memory="auto").options() if o[2] <= limit]
        if unasked:
            reason += f"; {flags(*unasked[0][:2])} fits"
        return 1, reason
    w, m, need = fitting[0]
    if facts.download and not facts.reachable:
        return 1, (f"cannot run yet: {facts.hub}, and {facts.model} is not in the Hub cache ({human(facts.download)} "
                   f"to download); {flags(w, m)} would fit")
    if facts.download and not facts.download_room:
        return 1, (f"cannot run: the download, {human(facts.download)}, does not fit in {facts.download_dir} "
                   f"({human(facts.download_free or 0)} free); set HF_HOME to a folder on a larger disk")
    then = f", after a download of {human(facts.download)}" if facts.download else ""
    return 0, f"can run: {flags(w, m)} ({human(need)} of weights at once, {human(limit)} allowed){then}"


# ---------------------------------------------------------------------------------------------------------
# Sizes


def estimate(cls, config: dict | None, stored: int, widths, where="") -> dict:
    """{width: bytes once loaded} of one model whose files hold ``stored`` bytes, from its config alone (the
    released config when None): a -q width quantizes what the model's predicate picks, at the bytes per value
    the files store. A converted model (its config has a quantization block) loads as stored."""
    if config and config.get("quantization"):
        return dict.fromkeys(widths, stored)
    model = loading.build(cls, config or released.config(cls.component), where or cls.component)  # lazy: nothing is allocated
    params = dict(tree_flatten(model.parameters()))
    itemsize = stored / max(sum(v.size for v in params.values()), 1)
    out = {}
    for width in widths:
        if width is None or not cls.quantize_by_default:
            out[width] = stored
            continue
        spec = Q.as_spec(width)
        shapes = [params[f"{layer}.weight"].shape for layer in Q.quantizable_layers(model, spec.group_size)[0]]
        scale = max(round(itemsize), 1)  # scales and biases in the weights' dtype
        out[width] = round(stored - sum(math.prod(s) for s in shapes) * itemsize
                           + sum(Q.quantized_nbytes(s, spec, scale) for s in shapes))
    return out


def local_weights(root: Path, widths) -> tuple[dict, bool]:
    """({model: {width: bytes}}, converted) of a pipeline folder, from its safetensors headers: the converter's
    plan of each model at each width (what load-time quantization holds), or a converted model's stored bytes."""
    weights, converted = {}, False
    for name, cls in MODELS.items():
        folder = loading.component_folder(root, name)
        sizes = {}
        for width in widths:
            spec = Q.as_spec(width) if width and cls.quantize_by_default else None
            try:
                plan = Plan.make(cls, folder, spec, None)
            except ConvertError:  # converted already: it loads as it is stored
                sizes, converted = dict.fromkeys(widths, loading.weight_bytes(folder)), True
                break
            sizes[width] = scan(plan)[1]
        weights[name] = sizes
    return weights, converted


def check_pipeline_folder(root: Path):
    """A local -m: one line for what makes it unusable (GlmImagePipeline.from_pretrained's and the CLI's words)."""
    loading.check_pipeline_folder(root)
    missing = [n for n in REQUIRED if not (root / n).is_dir()]
    if missing:
        raise loading.WeightsError(f"{root} lacks {', '.join(m + '/' for m in missing)}")
    for name in MODELS:
        loading.safetensors_files(root / name)  # the weights are there (names a missing shard)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


# ---------------------------------------------------------------------------------------------------------
# The Hub: asked briefly, in a thread that is left behind if it hangs


def within(work, seconds: float):
    """``work()``'s value, or raise its error, or TimeoutError after ``seconds`` (the thread is left to finish)."""
    box = {}

    def run():
        try:
            box["value"] = work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    return box["value"]


def hub_listing(repo: str, files: bool) -> tuple[str | None, dict[str, int]]:
    """(the commit, {file: bytes}) of a Hub repo, sizes from the listing only; ``files=False``: just ask."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=files, timeout=HUB_TIMEOUT)
    return info.sha, {s.rfilename: s.size or 0 for s in (info.siblings or [])} if files else {}


def hub_configs(repo: str, revision: str | None, names) -> dict[str, dict]:
    """Each model's config.json (small files, into the Hub cache as a run would fetch them)."""
    from huggingface_hub import hf_hub_download

    out = {}
    for name in names:
        path = Path(hf_hub_download(repo, f"{name}/config.json", revision=revision, etag_timeout=HUB_TIMEOUT))
        out[name] = loading.read_config(path.parent)
    return out


def ask_hub(repo: str, files: bool) -> tuple[str, str, tuple | None]:
    """(state, one phrase, listing): state "answered", "offline" (HF_HUB_OFFLINE: not asked) or "silent"."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "offline", "the Hub was not asked (offline: HF_HUB_OFFLINE is set)", None
    t0 = time.perf_counter()
    try:
        listing = within(lambda: hub_listing(repo, files), HUB_TIMEOUT + 1)
    except RepositoryNotFoundError:
        raise loading.WeightsError(f"{repo} is not on the Hugging Face Hub (or it is private or gated: log in with "
                                   "hf auth login)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        what = f"HTTP {status}" if status else " ".join(str(e).split())[:80]
        return "silent", f"the Hub answered with an error ({what}) at {constants.ENDPOINT}", None
    except Exception as e:  # network: no answer
        detail = " ".join(str(e).split())[:120]
        detail = detail if isinstance(e, TimeoutError) else f"{type(e).__name__}: {detail}"
        return "silent", f"the Hub did not answer ({detail}) at {constants.ENDPOINT}", None
    return "answered", f"the Hub answered in {time.perf_counter() - t0:.1f} s", listing


def cached_snapshot(repo: str) -> Path | None:
    """The Hub cache's snapshot of ``repo`` when it holds every model's weights and the required folders."""
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(repo, "model_index.json")
    if not isinstance(index, str):
        return None
    root = Path(index).parent
    try:
        check_pipeline_folder(root)
    except loading.WeightsError:
        return None
    return root


def room(folder: Path, need: int) -> tuple[int, bool]:
    """(free bytes on the disk of ``folder``, or of the folder it would be made in; ``need`` fits there by the
    converter's margin)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        check_free_space(existing / "output", need)
        fits = True
    except ConvertError:
        fits = False
    return shutil.disk_usage(existing).free, fits


def same_disk(a: Path, b: Path) -> bool:
    def device(p: Path) -> int:
        while not p.exists() and p != p.parent:
            p = p.parent
        return p.stat().st_dev

    return device(a) == device(b)


# ---------------------------------------------------------------------------------------------------------
# Gathering


def gather(model: str, bits: int | None = None, memory: str = "auto") -> Facts:
    """Everything ``verdict`` and ``render`` need, for ``-m model``; a WeightsError names a model that cannot be
    checked (a missing folder, a bad repo id, a repo the Hub does not have)."""
    from huggingface_hub import constants

    from .pipeline.pipeline import DEFAULT_REPO

    facts = Facts(model=str(model), source="", budget=memory_budget(), weights=None, bits=bits, memory=memory)
    widths = facts.widths()
    cache = Path(constants.HF_HUB_CACHE)
    copied = 0
    if loading.is_local(model):
        root = Path(model).expanduser()
        check_pipeline_folder(root)
        facts.source = "a local folder"
        facts.hub = ask_hub(DEFAULT_REPO, files=False)[1] + "; a local folder needs none"
        facts.weights, facts.converted = local_weights(root, widths)
        copied = sum(folder_bytes(root / c) for c in COPIED)
    else:
        loading.check_repo_id(str(model))
        state, facts.hub, listing = ask_hub(model, files=True)
        if state == "answered":
            hub_sizes(facts, listing, widths)
            copied = sum(s for f, s in listing[1].items() if f.split("/")[0] in COPIED)
        else:
            snapshot = cached_snapshot(model)
            if snapshot is not None:
                facts.source = f"the Hub cache ({snapshot})"
                facts.weights, facts.converted = local_weights(snapshot, widths)
                copied = sum(folder_bytes(snapshot / c) for c in COPIED)
            elif model == DEFAULT_REPO:
                facts.source = "the released checkpoint's figures (the weights only)"
                facts.weights = {n: estimate(MODELS[n], None, b, widths) for n, b in RELEASED.items()}
                facts.download, facts.reachable = sum(RELEASED.values()), False
    if facts.download:
        facts.download_dir = cache
        facts.download_free, facts.download_room = room(cache, facts.download)
    if facts.weights is not None and not facts.converted:
        out = Path.cwd()
        shared = facts.download and same_disk(out, cache)
        for b in [w for w in widths if w]:
            size = sum(s[b] for s in facts.weights.values()) + copied
            free, fits = room(out, size + (facts.download if shared else 0))
            facts.conversions.append((b, size, out, free, fits, bool(shared)))
    return facts


def hub_sizes(facts: Facts, listing: tuple, widths):
    """Sizes from the Hub's listing: each model's *.safetensors, the download (what a run fetches: every component
    folder and model_index.json, less what the cache holds), and the models' configs (else the released ones)."""
    from huggingface_hub import try_to_load_from_cache

    sha, files = listing
    folders = {f.split("/")[0] for f in files if "/" in f}
    missing = [n for n in REQUIRED if n not in folders]
    if missing:
        raise loading.WeightsError(f"{facts.model} lacks {', '.join(m + '/' for m in missing)} on the Hub")
    stored = {n: sum(s for f, s in files.items() if f.startswith(n + "/") and f.count("/") == 1
                     and f.endswith(".safetensors")) for n in MODELS}
    try:
        configs = within(lambda: hub_configs(facts.model, sha, list(MODELS)), 3 * HUB_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - the released configs stand in
        configs = {}
        facts.notes.append(f"the models' config.json did not come ({type(e).__name__}): -q sizes use the released "
                           "configs")
    facts.weights = {n: estimate(MODELS[n], configs.get(n), stored[n], widths, f"{facts.model}/{n}") for n in MODELS}
    facts.converted = any(c.get("quantization") for c in configs.values())
    wanted = {f: s for f, s in files.items() if f == "model_index.json" or f.split("/")[0] in {c.name for c in COMPONENTS}}
    cached = sum(s for f, s in wanted.items() if isinstance(try_to_load_from_cache(facts.model, f, revision=sha), str))
    facts.download = sum(wanted.values()) - cached
    facts.source = "the Hub's file listing" + (f" ({human(cached)} of it in the Hub cache)" if cached else "")


# ---------------------------------------------------------------------------------------------------------
# The screen


def device_line() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    name = info.get("device_name")
    return f"{mx.__version__}, {platform.system()} {platform.machine()}, device {device}" + (f" ({name})" if name else "")


def budget_line(budget: int) -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if "max_recommended_working_set_size" in info:  # components.memory_budget's first choice
        total = info.get("memory_size")
        what = "Metal's recommended working set" + (f" of {human(total)}" if total else "")
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        what = f"memory available now, of {human(total)}"
    return f"{human(budget)} ({what}); the models may take {RESIDENT_SHARE:.0%}: {human(allowed(budget))}"


def label(width) -> str:
    return f"-q {width}" if width else "no -q"


def render(facts: Facts, reason: str) -> str:
    name_w, num_w = 26, 12  # each column: a number right-aligned in num_w, then " fits" / " no" (5)
    lines = [f"{'MLX':<16}{device_line()}",
             f"{'memory budget':<16}{budget_line(facts.budget)}",
             f"{'model':<16}{facts.model}" + (f": {facts.source}" if facts.source else ""),
             f"{'Hugging Face':<16}{facts.hub}"]
    lines += [f"{'':<16}{note}" for note in facts.notes]
    if facts.weights is not None:
        widths = facts.widths()
        head = "weights once loaded" + ("" if facts.source == "a local folder" else ", about")
        lines.append(f"{head:<{name_w}}" + "".join(f"{label(w):>{num_w}}{'':5}" for w in widths).rstrip()
                     + ("   (converted: -q changes nothing)" if facts.converted else ""))
        for name, sizes in facts.weights.items():
            lines.append(f"  {name:<{name_w - 2}}" + "".join(f"{human(sizes[w]):>{num_w}}{'':5}" for w in widths).rstrip())
        limit = allowed(facts.budget)
        lines.append(f"memory, {human(limit)} allowed")
        for mode, what in (("resident", "resident: all at once"), ("staged", "staged: largest stage")):
            cells = []
            for w in widths:
                need = peaks({n: s[w] for n, s in facts.weights.items()})[mode]
                cells.append(f"{human(need):>{num_w}} {'fits' if need <= limit else 'no':<4}")
            lines.append(f"  {what:<{name_w - 2}}" + "".join(cells).rstrip())
        lines.append("disk")
        if facts.download:
            lines.append(f"  {'download':<{name_w - 2}}{human(facts.download)} into {facts.download_dir}: "
                         f"{human(facts.download_free or 0)} free, {'fits' if facts.download_room else 'does not fit'}")
        else:
            lines.append(f"  {'download':<{name_w - 2}}none")
        for bits, size, out, free, fits, shared in facts.conversions:
            lines.append(f"  {f'convert -q {bits}':<{name_w - 2}}{human(size)} into {out}: {human(free)} free, "
                         + ("fits" if fits else "does not fit") + (" with the download" if shared else ""))
    lines.append(f"{'verdict':<16}{reason}")
    return "\n".join(lines)


def main(args) -> int:
    """``mlx-glm-image --check`` with the parsed -m, -q and --memory."""
    from .cli import fail, model_defaults

    try:
        facts = gather(args.model or model_defaults()["model"], args.quantize, args.memory or "auto")
        code, reason = verdict(facts)
    except (loading.WeightsError, ConvertError, Q.QuantizeError, OSError) as e:
        return fail(e)
    print(render(facts, reason), flush=True)
    return code
