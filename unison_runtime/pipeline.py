"""The whole Unison job in one object: instruction → plan → answer, or → projector → VACE → frames.

:class:`UnisonPipeline` follows the plan's path through the pack, one method per stage, so each
stage can also be called alone (a node, a test or a benchmark picks the ones it needs):

``read`` (instruction + media) → ``make_plan`` (any planner) → ``answer`` (understanding), or
``projector_tokens`` (stage one's hidden states → projector) → ``contexts`` (umT5 + tokens) →
``sources`` (VACE inputs) → ``sample`` (frames). ``run`` does all of it.

Models load lazily, on first use, and stay cached until :meth:`UnisonPipeline.release`, so a
second job with the same models does no loading. A cached model whose file was deleted is
reported, one whose file was replaced is loaded again (``files``, :mod:`.faults`). A job that
fails (cancelled, out of memory, a bad plan or medium) leaves the cached models as they were.

The *planner* decides the plan; *stage one* answers and gives the projector its hidden states.
They are the same object unless told otherwise (the selftest plans with the rule planner and
answers with a tiny Qwen).

:func:`run_cli_job` backs ``python -m unison_runtime run``; where it finds the weights is one
small function, :func:`locate_models`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PathError, UnisonError, WeightsError
from .faults import FileSignature, call_freeing_memory, file_signature, memory_advice, stage_one_advice
from .instruction import Instruction, parse_instruction
from .media import Medium, read_reference
from .media_probe import with_media_info
from .plan import Plan
from .progress import Progress, files_size

if TYPE_CHECKING:
    import torch

    from .planner.base import Planner
    from .projector import UnisonProjector
    from .vace.models import VaceModels
    from .vace.sampler import CancelFn, Generation, ProgressFn, SamplingOptions
    from .vace.sources import VaceInputs
    from .vace.text import TextContexts

Loader = Callable[[], Any]

log = logging.getLogger(__name__)

_FILE_KINDS = {"planner": "planner model file", "stage_one": "stage-one model file", "projector": "projector file",
               "vace": "VACE model file", "salient": "salient annotator file",
               "text_encoder": "umT5 text encoder file"}
_MODEL_NAMES = {"planner": "the Qwen2.5-VL planner", "stage_one": "the Qwen2.5-VL stage one",
                "projector": "the projector", "vace": "Wan2.1-VACE (transformer, VAE, umT5)",
                "salient": "VACE's salient annotator (u2net)", "text_encoder": "the umT5 text encoder"}
#: Models too large to hold two of at once on a small machine; a staged pipeline holds one at a time.
_HEAVY = ("planner", "stage_one", "text_encoder", "vace")


@dataclass
class UnisonResult:
    """One job's outcome. ``answer`` for understanding tasks; ``frames`` (float32 ``[T, H, W, 3]``
    in 0..1 on the CPU) and ``fps`` for generation; ``notes`` tells what was adapted or skipped."""

    plan: Plan
    answer: str | None = None
    frames: Any | None = None
    fps: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.plan.output


class UnisonPipeline:
    """Plan, answer and generate with cached models.

    Each model is given either loaded or as a zero-argument loader called on first use:

    - ``planner``: decides the plan; default the rule planner.
    - ``stage_one``: answers understanding tasks and gives hidden states to the projector;
      default the planner (the rule planner has neither: no answer, no projector tokens).
    - ``projector``: a :class:`~unison_runtime.projector.UnisonProjector` (or loader); ``None``:
      the conditional context is umT5 alone.
    - ``vace``: :class:`~unison_runtime.vace.models.VaceModels` (or loader); needed for generation.
    - ``salient``: VACE's salient annotator (:class:`~unison_runtime.vace.salient.SalientAnnotator`,
      or loader); masks a video edit given no mask, as Unison does. ``None``: such an edit keeps
      the source, whole frame editable, and its notes say so.
    - ``text_encoder``: a :class:`VaceModels` holding only umT5 and its tokenizer (or loader, e.g.
      ``load_vace_from_files(..., parts=TEXT_PARTS)``); ``None``: prompts are encoded with ``vace``'s.

    ``roots`` are the folders ``###name###`` references resolve in; ``options`` the default
    sampling options of every job. ``files`` names, per model given as a loader, the files or
    folders it loads from: before a cached model is served they are checked, so a deleted file is
    a :class:`WeightsError` and a replaced one is loaded again instead of served stale.
    ``release_text_encoder`` / ``release_planner``: before sampling, drop umT5 (once the prompt is
    encoded) / the Qwen stage one (once its hidden states are projected), giving their memory to
    the sampler; the next job loads them again. For one-off jobs on a small GPU.
    ``progress`` is told about each model load and stage (:mod:`.progress`; default: silent).
    ``staged``: hold one large model at a time (the Qwen stage one, umT5, the transformer + VAE),
    each loaded only after the previous one was released: stage one plans and projects, umT5
    encodes both prompts, then the sampler loads. With ``text_encoder`` given as a loader of umT5
    alone, the transformer and umT5 never share memory. Results are the same as unstaged.
    """

    def __init__(
        self,
        *,
        planner: Planner | Loader | None = None,
        stage_one: Planner | Loader | None = None,
        projector: UnisonProjector | Loader | None = None,
        vace: VaceModels | Loader | None = None,
        salient: Any = None,
        roots: Sequence[str | Path] = (),
        options: SamplingOptions | None = None,
        files: Mapping[str, Sequence[str | Path | None]] | None = None,
        release_text_encoder: bool = False,
        release_planner: bool = False,
        text_encoder: VaceModels | Loader | None = None,
        staged: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self._sources: dict[str, Any] = {"planner": planner, "stage_one": stage_one, "projector": projector,
                                         "vace": vace, "salient": salient, "text_encoder": text_encoder}
        unknown = sorted(set(files or {}) - set(self._sources))
        if unknown:
            raise UnisonError(f"files given for unknown model(s) {unknown}; expected some of {sorted(self._sources)}")
        self._files = {name: tuple(paths) for name, paths in (files or {}).items()}
        self._signatures: dict[str, FileSignature] = {}
        self._loaded: dict[str, Any] = {}
        self.roots = [Path(r) for r in roots]
        self.options = options
        self._negative_cache: dict[str, Any] = {}
        self.release_text_encoder_after_encoding = release_text_encoder
        self.release_planner_before_sampling = release_planner
        self.progress = progress or Progress()
        self.staged = staged

    # ------------------------------------------------------------------ models

    def _get(self, name: str) -> Any:
        if name in self._signatures:
            self._check_files(name)
        if name not in self._loaded:
            source = self._sources[name]
            if self.staged and name in _HEAVY and _is_loader(source):
                self._release_others(name)
            signature = None
            if _is_loader(source) and any(p is not None for p in self._files.get(name, ())):
                # Stamped before loading: a file replaced while it loads counts as replaced next time.
                signature = file_signature(*self._files[name], what=_FILE_KINDS[name])
            self._loaded[name] = self._load(name, source) if _is_loader(source) else source
            if signature is not None:
                self._signatures[name] = signature
        return self._loaded[name]

    def _load(self, name: str, loader: Loader) -> Any:
        import time

        paths = [p for p in self._files.get(name, ()) if p is not None]
        where = ", ".join(str(p) for p in paths) or "the given loader"
        self.progress.loading(_MODEL_NAMES[name], where, files_size(paths) if paths else None)
        start = time.perf_counter()
        model = loader()
        self.progress.loaded(_MODEL_NAMES[name], time.perf_counter() - start)
        return model

    def _release_others(self, name: str) -> None:
        """Staged: let every other large model this pipeline loaded go before ``name`` loads."""
        others = [other for other in _HEAVY if other != name and self._loaded.get(other) is not None
                  and _is_loader(self._sources[other])]
        if others:
            log.info("staged: releasing %s before loading %s", ", ".join(others), name)
            self._drop(*others)
            gc.collect()
            _empty_cuda_cache()

    def _check_files(self, name: str) -> None:
        """Drop a cached model whose files changed; report one whose file was deleted."""
        signature = self._signatures[name]
        try:
            changed = signature.changed()
        except WeightsError:
            self.release(name)  # never serve it again; put the file back and it loads anew
            raise
        if changed:
            log.info("%s changed since it was loaded (%s); loading it again", _FILE_KINDS[name],
                     ", ".join(signature.roots))
            self.release(name)

    @property
    def planner(self) -> Planner:
        planner = self._get("planner")
        if planner is None:
            from .planner.rules import RulePlanner

            planner = self._loaded["planner"] = RulePlanner()
        return planner

    @property
    def stage_one(self) -> Planner:
        return self._get("stage_one") or self.planner

    @property
    def projector(self) -> UnisonProjector | None:
        return self._get("projector")

    @property
    def vace(self) -> VaceModels:
        models = self._get("vace")
        if models is None:
            raise WeightsError("generation needs the Wan2.1-VACE models; none were given to the pipeline")
        return models

    @property
    def text_models(self) -> VaceModels:
        """The models prompts are encoded with: the ``text_encoder`` source when given, else ``vace``."""
        if self._sources["text_encoder"] is None:
            return self.vace
        models = self._get("text_encoder")
        if models is None or models.text_encoder is None:
            raise WeightsError("the umT5 text encoder given to the pipeline holds no encoder")
        return models

    def set_source(self, name: str, source: Any, files: Sequence[str | Path | None] | None = None) -> None:
        """Replace how model ``name`` is obtained (e.g. split loaders once a job is found to need
        staging); the model must not be loaded yet."""
        if name not in self._sources:
            raise UnisonError(f"unknown model {name!r}; expected one of {sorted(self._sources)}")
        if self._loaded.get(name) is not None:
            raise UnisonError(f"model {name!r} is already loaded; release it before changing its source")
        self._sources[name] = source
        if files is not None:
            self._files[name] = tuple(files)

    def loaded(self) -> list[str]:
        """Names of the models loaded so far (for displays and caching checks)."""
        return [name for name, value in self._loaded.items() if value is not None]

    def release(self, *names: str) -> None:
        """Drop the named models (all when none are named); loaders run again on next use."""
        for name in names or tuple(self._loaded):
            if name not in self._sources:
                raise UnisonError(f"unknown model {name!r}; expected one of {sorted(self._sources)}")
        names = names or tuple(self._loaded)
        if "vace" in names or "text_encoder" in names:
            self._negative_cache.clear()
        self._drop(*names)
        gc.collect()
        _empty_cuda_cache()

    def _drop(self, *names: str) -> None:
        """Forget the named models (unloading those this pipeline loaded); cached embeddings stay."""
        for name in names:
            value = self._loaded.pop(name, None)
            self._signatures.pop(name, None)
            if value is None or not _is_loader(self._sources[name]):
                continue  # a model the caller passed in stays theirs: only our reference is dropped
            if name in ("vace", "text_encoder"):
                value.release()
            elif hasattr(value, "unload"):
                value.unload()

    def release_text_encoder(self) -> None:
        """Drop umT5 from the loaded VACE models (:meth:`VaceModels.release_text_encoder`).

        Sampling goes on without it; the next prompt to encode loads the VACE models again
        (when they were given as a loader) or is a clear error (when they were passed in).
        """
        if self._loaded.get("text_encoder") is not None:
            self._drop("text_encoder")
            gc.collect()
            _empty_cuda_cache()
        models = self._loaded.get("vace")
        if models is not None and models.text_encoder is not None:
            models.release_text_encoder()
            gc.collect()
            _empty_cuda_cache()

    # ------------------------------------------------------------------ stages

    def read(
        self, instruction: str | Instruction, media: Mapping[str, Medium] | None = None
    ) -> tuple[Instruction, list[Medium]]:
        """Parse the instruction and decode the media it references, in reference order.

        ``media`` maps a reference name (as written between ``###``) to an already decoded
        medium (an image wired in a graph); other names are read from ``roots``.
        """
        media = dict(media or {})
        if isinstance(instruction, str):
            kinds = {name: medium.kind for name, medium in media.items()}
            instruction = parse_instruction(instruction, self.roots or None, must_exist=True, kinds=kinds)
        files = iter(instruction.resolved)
        decoded: list[Medium] = []
        for ref in instruction.media:
            if ref.path in media:
                decoded.append(media[ref.path])
                continue
            path = next(files, None)
            if path is None:
                raise PathError(f"media reference {ref.path!r} was neither given nor found: pass it in the media "
                                "mapping, or give the folder it is in (--input-dir)")
            decoded.append(read_reference(ref.path, self.roots))  # re-opened without a check-then-use gap
        return with_media_info(instruction, decoded), decoded

    def make_plan(self, instruction: Instruction) -> Plan:
        """The planner's plan (validated; media roles assigned)."""
        return self.planner.plan(instruction)

    def answer(self, instruction: Instruction, media: Sequence[Medium]) -> str | None:
        """Stage one's answer to an understanding instruction (``None`` without a stage-one model)."""
        return self.stage_one.answer(instruction, media)

    def projector_tokens(self, instruction: Instruction) -> torch.Tensor | None:
        """The projector's tokens ``[1, N, D]`` from stage one's hidden states, or ``None`` when
        there is no projector or no stage-one model (the context is then umT5 alone)."""
        projector = self.projector
        if projector is None:
            return None
        hidden = self.stage_one.hidden_states(instruction)
        if hidden is None:
            return None
        from .projector import project

        return project(projector, hidden)

    def contexts(self, plan: Plan, tokens: torch.Tensor | None = None,
                 negative_prompt: str | None = None) -> TextContexts:
        """umT5(plan prompt) + ``tokens`` and umT5(negative prompt), both zero-padded to 2048.

        The negative embedding is cached per negative prompt until the VACE models are released.
        """
        from .vace.text import assemble_contexts, encode_negative, encode_text, release_encoder_pages

        models = self.text_models
        if self._sources["text_encoder"] is not None:
            dim = models.text_encoder.config.d_model  # umT5's width is the transformer's text_dim
        else:
            if models.text_encoder_released and _is_loader(self._sources["vace"]):
                log.info("umT5 was released after the last encoding; loading the VACE models again")
                self.release("vace")
                models = self.vace
            dim = models.transformer.config.text_dim
        if tokens is not None and tokens.shape[-1] != dim:
            source = getattr(self.projector, "source", None) or "the projector"
            raise WeightsError(f"{source} makes {tokens.shape[-1]}-wide tokens, but this VACE model's text_dim is "
                               f"{dim}: the projector's t5_dim must match the umT5 encoder")
        key = "\0wan-default" if negative_prompt is None else negative_prompt
        if key not in self._negative_cache:
            self._negative_cache[key] = encode_negative(models, negative_prompt)
        contexts = assemble_contexts(encode_text(models, plan.prompt), tokens, self._negative_cache[key])
        release_encoder_pages(models)  # kept for the next job, but not resident beside the transformer
        return contexts

    def sources(self, plan: Plan, media: Sequence[Medium]) -> VaceInputs:
        """VACE source frames, masks and references for the plan's task (see :mod:`.vace.sources`).

        They may be at another size or length than ``plan`` (a source's aspect ratio and length):
        ``inputs.used_plan(plan)`` is the plan to sample with.
        """
        from .plan import Task
        from .vace.sources import prepare_vace_inputs

        needs_salient = plan.task is Task.VIDEO_EDITING and plan.mask_index is None
        annotator = self._get("salient") if needs_salient else None
        return prepare_vace_inputs(plan, media, salient=annotator.saliency if annotator is not None else None)

    def sample(
        self,
        plan: Plan,
        inputs: VaceInputs,
        contexts: TextContexts,
        options: SamplingOptions | None = None,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> Generation:
        """Denoise and decode with Wan2.1-VACE."""
        from .vace.sampler import sample

        neg = contexts.neg if self._options(options).uses_guidance else None
        bar = self.progress.steps("sampling")

        def step(done: int, total: int) -> None:
            bar(done, total)
            if progress is not None:
                progress(done, total)

        return sample(self.vace, plan, inputs, contexts.cond, neg, self._options(options),
                      progress=step, cancel=cancel, on_stage=self.progress.stage)

    def generate(
        self,
        plan: Plan,
        instruction: Instruction,
        media: Sequence[Medium],
        options: SamplingOptions | None = None,
        *,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> UnisonResult:
        """Sources → hidden states → projector → contexts → sample, for a generation plan.

        The plan and media are checked against each other and against the VACE model before any
        model runs, so a bad plan is a :class:`PlanError` / :class:`MediaError` naming the field or
        medium. Out of memory anywhere is an :class:`~unison_runtime.errors.OutOfMemory` naming the
        settings to lower, raised after this call's tensors were let go.
        """
        if plan.output == "text":
            raise UnisonError(f"task {plan.task.value} is an understanding task; use answer()")
        from .vace.sampler import check_inputs

        options = self._options(options)
        plan = plan.with_changes()  # validated again: a plan is checked wherever it came from
        notes = list(plan.notes)
        stage = ["preparing the VACE inputs"]
        used = [plan]  # the plan at the size and length the sources were read at

        def work() -> Generation:
            # Every tensor this job allocates lives in this frame, which an out-of-memory error clears.
            self.progress.stage("preparing the VACE inputs")
            inputs = self.sources(plan, media)
            used[0] = inputs.used_plan(plan)
            if not self.staged:  # staged: checked once the transformer is loaded, after encoding
                check_inputs(self.vace, used[0], inputs)
            stage[0] = "running stage one for the projector tokens"
            if self._sources["projector"] is not None:
                self.progress.stage(stage[0])
            tokens = self.projector_tokens(instruction)
            if tokens is None:
                why = "no projector was given" if self.projector is None else "the planner has no stage-one model"
                notes.append(f"{why}: the text context is the umT5 embedding alone (no projector tokens)")
            stage[0] = "encoding the prompt with umT5"
            self.progress.stage(stage[0])
            contexts = self.contexts(plan, tokens, options.negative_prompt)
            if self.release_text_encoder_after_encoding:
                self.release_text_encoder()
            if self.release_planner_before_sampling:
                self.release(*(name for name in ("stage_one", "planner") if name in self._loaded))
            if self.staged:
                stage[0] = "loading the VACE transformer and VAE"
                check_inputs(self.vace, used[0], inputs)
            notes.extend(inputs.notes)
            stage[0] = "sampling"
            return self.sample(used[0], inputs, contexts, options, progress=progress, cancel=cancel)

        def advice(exc: BaseException) -> str:
            models = self._loaded.get("vace")
            return memory_advice(exc, stage=stage[0], width=used[0].width, height=used[0].height,
                                 num_frames=used[0].num_frames, device=getattr(models, "device", "the device"),
                                 batch_cfg=options.batch_cfg, guidance=options.guidance,
                                 text_device=getattr(models, "text_device", None))

        generation = call_freeing_memory(work, advice, stage=lambda: stage[0])
        notes.extend(generation.notes)
        return UnisonResult(plan=used[0], frames=generation.frames, fps=generation.fps, notes=notes)

    def run(
        self,
        instruction: str | Instruction,
        media: Mapping[str, Medium] | None = None,
        *,
        plan: Plan | None = None,
        options: SamplingOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> UnisonResult:
        """The whole job: read, plan (unless ``plan`` is given, e.g. a user-edited one), then answer or generate."""
        instruction, decoded = self.read(instruction, media)
        return self.run_read(instruction, decoded, plan=plan, options=options, progress=progress, cancel=cancel)

    def run_read(
        self,
        instruction: Instruction,
        media: Sequence[Medium],
        *,
        plan: Plan | None = None,
        options: SamplingOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> UnisonResult:
        """:meth:`run` after :meth:`read`: ``media`` are the decoded references in instruction order."""
        if plan is None:
            planner = self.planner
            self.progress.stage(f"planning with {planner_label(planner)}")
            plan = self._with_stage_one_memory(lambda: self.make_plan(instruction), "planning", planner)
        if plan.output != "text":
            return self.generate(plan, instruction, media, options, progress=progress, cancel=cancel)
        notes = list(plan.notes)
        self.progress.stage(f"answering with {planner_label(self.stage_one)}")
        answer = self._with_stage_one_memory(lambda: self.answer(instruction, media), "answering", self.stage_one)
        if answer is None:
            notes.append(f"{getattr(self.stage_one, 'name', 'the planner')} has no model to answer with: "
                         "understanding tasks need the Qwen2.5-VL stage one")
        else:
            plan = plan.with_changes(answer=answer)
        return UnisonResult(plan=plan, answer=answer, notes=notes)

    @staticmethod
    def _with_stage_one_memory(work: Callable[[], Any], doing: str, model: Any) -> Any:
        """``work()``, an out-of-memory error in it explained for stage one (see :mod:`.faults`)."""
        name = getattr(model, "name", "stage one")
        stage = f"{doing} with {name}"

        def advice(exc: BaseException) -> str:
            return stage_one_advice(exc, stage=stage, device=getattr(model, "device", "the device"),
                                    max_video_frames=getattr(model, "max_video_frames", None))

        return call_freeing_memory(work, advice, stage=stage)

    def _options(self, options: SamplingOptions | None) -> SamplingOptions:
        if options is not None:
            return options
        if self.options is None:
            from .vace.sampler import SamplingOptions

            self.options = SamplingOptions()
        return self.options


def planner_label(planner: Any) -> str:
    """``the rule planner`` / ``qwen2.5-vl:...`` for progress lines."""
    name = getattr(planner, "name", None)
    return "the rule planner" if name in (None, "rules") else str(name)


def _is_loader(value: Any) -> bool:
    """A zero-argument loader, as opposed to a loaded model (torch modules are callable too)."""
    if not callable(value):
        return False
    import torch

    return not isinstance(value, torch.nn.Module)


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- model locations


@dataclass
class ModelLocations:
    """What :func:`locate_models` found: a loader for stage two (``None``: not found; ``paths``
    can say why) and the stage-one and projector paths."""

    load_vace: Callable[..., VaceModels] | None
    vace: str | None
    qwen: Path | None
    lora: Path | None
    projector: Path | None
    paths: Any = None  # the models_dir.ModelPaths the choice was made from
    salient: Path | None = None  # VACE's salient annotator (VACE-Annotators/salient/u2net.pt), if installed


def locate_models(models_dir: str | Path, *, explicit: Mapping[str, Any] | None = None) -> ModelLocations:
    """Find the weights under a ComfyUI-style ``models_dir``: the one step that knows where files are.

    ``DIR/diffusion_models``, ``DIR/vae``, ``DIR/text_encoders`` and ``DIR/unison`` are searched by
    content (:func:`unison_runtime.models_dir.find_models`). Stage two loads from a whole
    ``Wan2.1-VACE-1.3B-diffusers`` folder when there is one, else from the single files
    (transformer, VAE, umT5). ``explicit`` paths (``ModelPaths`` field names) win over the search.
    """
    from functools import partial

    from .models_dir import find_models

    paths = find_models(models_dir, explicit=explicit)
    load_vace: Callable[..., VaceModels] | None = None
    vace: str | None = None
    if paths.diffusers_dir is not None:
        from .vace.loading import load_vace_diffusers

        load_vace, vace = partial(load_vace_diffusers, paths.diffusers_dir), str(paths.diffusers_dir)
    elif None not in (paths.transformer, paths.vae, paths.text_encoder):
        from .vace.files import load_vace_from_files

        load_vace = partial(load_vace_from_files, paths.transformer, paths.vae, paths.text_encoder,
                            tokenizer=paths.tokenizer)
        vace = ", ".join(str(p) for p in (paths.transformer, paths.vae, paths.text_encoder))
    from .vace.salient import find_salient_model

    salient = find_salient_model([models_dir, *paths.looked_in.get("unison", [])])
    return ModelLocations(load_vace=load_vace, vace=vace, qwen=paths.planner_model, lora=paths.planner_lora,
                          projector=paths.projector, paths=paths, salient=salient)


# --------------------------------------------------------------------------- CLI


OUTPUT_SUFFIX = {"text": ".txt", "image": ".png", "video": ".mp4"}


def write_result(result: UnisonResult, out: str | Path, *, exact: bool = False) -> Path:
    """Write the answer (.txt), image (.png) or video (.mp4 at the result's fps); the suffix follows the task.

    ``exact``: ``out`` is the final path as it is (the CLI resolved it with
    :func:`unison_runtime.preflight.output_path`). The file is written beside its final name and
    renamed into place, so an interrupted or failed write never leaves a half-written output.
    """
    import os

    from .media import write_image, write_video

    path = Path(out) if exact else Path(out).with_suffix(OUTPUT_SUFFIX[result.output])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # the suffix picks the format
    try:
        if result.output == "text":
            partial.write_text((result.answer or "") + "\n", encoding="utf-8")
        elif result.output == "image":
            write_image(result.frames[0].numpy(), partial)
        else:
            write_video(result.frames.numpy(), partial, fps=result.fps or result.plan.fps)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def sampling_options_from_args(args: Any) -> SamplingOptions:
    """SamplingOptions with the CLI's overrides (``None`` keeps the reference default)."""
    from .vace.sampler import SamplingOptions
    from .vace.speed_args import speed_values

    values = {name: getattr(args, attr, None) for name, attr in
              (("steps", "steps"), ("guidance", "guidance"), ("shift", "shift"), ("seed", "seed"),
               ("negative_prompt", "negative_prompt"), ("noise_device", "noise_device"))}
    values["vae_tiling"] = bool(getattr(args, "vae_tiling", False))
    values.update(speed_values(args))  # --cache, --compile, ... (vace/speed_args.py)
    return SamplingOptions(**{k: v for k, v in values.items() if v is not None})


def pipeline_from_args(args: Any, progress: Progress | None = None, *,
                       prepare_vace: Callable[[VaceModels], VaceModels] | None = None,
                       ) -> tuple[UnisonPipeline, ModelLocations]:
    """A pipeline over ``--models DIR``; ``--model``/``--lora`` override the stage-one folders.

    An explicit ``--model`` without ``--lora`` runs as given (it may be a merged planner): the
    LoRA found in ``DIR/unison`` is only added to the Qwen folder found next to it.
    ``prepare_vace`` is applied to every VACE load (e.g. context parallelism, :mod:`.parallel`).
    """
    from functools import partial

    locations = locate_models(args.models)
    if prepare_vace is not None and locations.load_vace is not None:
        locations.load_vace = _then(locations.load_vace, prepare_vace)
    qwen, lora = stage_one_folders(args, locations)
    if lora is not None and qwen is None:
        raise UnisonError(f"--lora needs a Qwen2.5-VL base: --model DIR, or one in {Path(args.models) / 'unison'}")
    device = getattr(args, "device", None)
    stage_one = None
    if qwen is not None:
        from .planner.qwen import load_planner

        stage_one = partial(load_planner, qwen, lora, device=device, dtype=getattr(args, "dtype", None),
                            attention=getattr(args, "attention", None))
    projector = None
    if locations.projector is not None:
        from .projector import load_projector

        projector = partial(load_projector, locations.projector)
    vace = partial(locations.load_vace, **_vace_options(args)) if locations.load_vace is not None else None
    salient = None
    if locations.salient is not None:
        from .vace.salient import SalientAnnotator

        salient = partial(SalientAnnotator.from_file, locations.salient)
    files = {"planner": [qwen, lora] if qwen is not None else [], "projector": [locations.projector],
             "vace": _vace_files(locations) if vace is not None else [], "salient": [locations.salient]}
    low_memory = bool(getattr(args, "low_memory", False))
    pipeline = UnisonPipeline(planner=stage_one, projector=projector, vace=vace, salient=salient,
                              roots=[getattr(args, "input_dir", None) or Path.cwd()], files=files,
                              release_text_encoder=low_memory, release_planner=low_memory, progress=progress)
    return pipeline, locations


def _then(load: Callable[..., Any], prepare: Callable[[Any], Any]) -> Callable[..., Any]:
    """``load`` followed by ``prepare`` on what it loaded."""
    def load_and_prepare(*args: Any, **kwargs: Any) -> Any:
        return prepare(load(*args, **kwargs))

    return load_and_prepare


def stage_one_folders(args: Any, locations: ModelLocations) -> tuple[Path | str | None, Path | str | None]:
    """The Qwen base and LoRA stage one runs with: ``--model`` / ``--lora``, else those in ``DIR/unison``.

    An explicit ``--model`` without ``--lora`` runs as given (it may be a merged planner): the LoRA
    found in ``DIR/unison`` is only added to the Qwen folder found next to it.
    """
    model, lora = getattr(args, "model", None), getattr(args, "lora", None)
    qwen = model or locations.qwen
    found_base = model is None or (locations.qwen is not None and Path(model).resolve() == locations.qwen.resolve())
    if lora is None and found_base:
        lora = locations.lora
    if qwen is None and getattr(args, "lora", None) is None:
        lora = None  # a LoRA found without its base cannot run: the rule planner plans
    return qwen, lora


def _vace_options(args: Any) -> dict[str, Any]:
    return {"device": getattr(args, "device", None), "dtype": getattr(args, "vace_dtype", None),
            "text_device": getattr(args, "text_device", None), "text_dtype": getattr(args, "text_dtype", None)}


def _vace_files(locations: ModelLocations) -> list[Path | None]:
    found = locations.paths
    if found.diffusers_dir is not None:
        return [found.diffusers_dir]
    return [found.transformer, found.vae, found.text_encoder, found.tokenizer]


def cli_memory_footprint(args: Any, locations: ModelLocations, plan: Plan) -> tuple[Any, Any]:
    """The footprint and settings of a CLI job for :mod:`.memory_estimate` (the one accounting the
    staging choice and the preflight share): weights as the loaders will hold them, in the dtypes
    the CLI's flags resolve to."""
    import torch

    from .memory_estimate import RunSettings, dtype_name, footprint_from_paths
    from .planner.qwen_loading import resolve_dtype as qwen_dtype
    from .vace.loading import default_device, resolve_dtype

    device = getattr(args, "device", None) or default_device()
    text_device = getattr(args, "text_device", None) or device
    transformer = dtype_name(resolve_dtype(getattr(args, "vace_dtype", None), device, role="transformer"))
    text = dtype_name(resolve_dtype(getattr(args, "text_dtype", None), text_device, role="text_encoder"))
    stage_one, lora = stage_one_folders(args, locations)
    footprint = footprint_from_paths(
        locations.paths, transformer_dtype=transformer, vae_dtype=dtype_name(resolve_dtype(None, device, role="vae")),
        text_dtype=text, stage_one=[stage_one] if stage_one is not None else [],
        stage_one_dtype=dtype_name(qwen_dtype(getattr(args, "dtype", None), torch.device(device))),
        stage_one_lora=lora)
    settings = RunSettings(device=device, text_device=text_device, transformer_dtype=transformer,
                           num_references=sum(1 for ref in plan.media if ref.role == "reference"))
    return footprint, settings


def choose_cli_memory(args: Any, locations: ModelLocations, plan: Plan,
                      sampling: SamplingOptions | None = None) -> Any:
    """Staging and guidance batching for a CLI job from the free memory and the estimate
    (:func:`.memory_estimate.choose_memory_mode`); ``--low-memory`` / ``--batch-cfg`` (or their
    ``--no-`` forms) override the choice."""
    from .memory_estimate import choose_memory_mode, free_memory

    footprint, settings = cli_memory_footprint(args, locations, plan)
    if sampling is not None:
        settings = replace(settings, guidance=sampling.guidance, vae_tiling=sampling.vae_tiling,
                           text_kv_cache=sampling.text_kv_cache)
    return choose_memory_mode(plan, footprint, settings, available=free_memory(settings.device),
                              staged=getattr(args, "low_memory", None), batch_cfg=getattr(args, "batch_cfg", None),
                              single_job=True)


def stage_pipeline(pipeline: UnisonPipeline, locations: ModelLocations, args: Any) -> None:
    """Make ``pipeline`` staged: umT5 loaded alone (for encoding), the transformer + VAE after it."""
    from functools import partial

    from .vace.files import SAMPLING_PARTS, TEXT_PARTS

    options = _vace_options(args)
    files = _vace_files(locations)
    pipeline.set_source("text_encoder", partial(locations.load_vace, parts=TEXT_PARTS, **options), files)
    pipeline.set_source("vace", partial(locations.load_vace, parts=SAMPLING_PARTS, **options), files)
    pipeline.staged = True
    pipeline.release_text_encoder_after_encoding = pipeline.release_planner_before_sampling = True


def run_cli_job(args: Any, progress: Progress | None = None, *,
                prepare_vace: Callable[[VaceModels], VaceModels] | None = None) -> dict[str, Any]:
    """``python -m unison_runtime run``: the whole job, the output written at ``--out`` (suffix from the task).

    Before the VACE models load: the devices exist, the output path is writable, and the plan's
    estimated peak memory fits what the device has free (:mod:`.memory_estimate`; VAE tiling is
    switched on by itself when only the decode would not fit).
    """
    from .preflight import check_device_available, output_path

    progress = progress or Progress()
    check_device_available(getattr(args, "device", None), "--device")
    check_device_available(getattr(args, "text_device", None), "--text-device")
    pipeline, locations = pipeline_from_args(args, progress, prepare_vace=prepare_vace)
    options = sampling_options_from_args(args)
    try:
        instruction, media = pipeline.read(args.instruction)
        planner = pipeline.planner
        progress.stage(f"planning with {planner_label(planner)}")
        plan = pipeline._with_stage_one_memory(lambda: pipeline.make_plan(instruction), "planning", planner)
        memory_note = None
        if plan.output != "text" and locations.load_vace is None:
            locations.paths.require_generation()  # names each missing file and the folder searched
        path = output_path(args.out, plan.task.value, OUTPUT_SUFFIX[plan.output])
        if plan.output != "text":
            choice = choose_cli_memory(args, locations, plan, options)
            if choice.staged:
                stage_pipeline(pipeline, locations, args)
            options = replace(options, batch_cfg=choice.batch_cfg)
            memory_note = choice.reason
            progress.note(memory_note)
            if not getattr(args, "no_memory_check", False):
                options = _memory_preflight(args, plan, locations, options, progress, staged=choice.staged)
        result = pipeline.run_read(instruction, media, plan=plan, options=options)
        if memory_note is not None:
            result.notes.append(memory_note)
        require_answer(result, args)
        path = write_result(result, path, exact=True)
        progress.wrote(path, result.output)
    finally:
        pipeline.release()
    return result_report(result, path=str(path))


def require_answer(result: UnisonResult, args: Any) -> None:
    """An understanding task planned by the rules has no answer: say what would answer it."""
    if result.output == "text" and result.answer is None:
        raise UnisonError(f"{result.plan.task.value} needs the Qwen2.5-VL stage one to answer: --model DIR, or a "
                          f"Qwen2.5-VL folder in {Path(args.models) / 'unison'}")


def result_report(result: UnisonResult, *, item_id: str | None = None, path: str | None = None) -> dict[str, Any]:
    """The JSON record of one job (``run``'s stdout, a batch's per-id line): the id (batch), task, output,
    the file written (``run``), plan, and whatever the result carries (answer, fps, notes)."""
    report: dict[str, Any] = {} if item_id is None else {"id": item_id}
    report.update(task=result.plan.task.value, output=result.output)
    if path is not None:
        report["path"] = path
    report["plan"] = result.plan.to_dict()
    if result.answer is not None:
        report["answer"] = result.answer
    if result.fps is not None:
        report["fps"] = result.fps
    if result.notes:
        report["notes"] = result.notes
    return report


def _memory_preflight(args: Any, plan: Plan, locations: ModelLocations, options: SamplingOptions,
                      progress: Progress, *, staged: bool = False) -> SamplingOptions:
    """Refuse a plan that will not fit (:class:`~.memory_estimate.MemoryWontFit`), before VACE loads."""
    from .memory_estimate import check_fits

    footprint, settings = cli_memory_footprint(args, locations, plan)
    settings = dataclasses.replace(settings, vae_tiling=options.vae_tiling, batch_cfg=options.batch_cfg,
                                   guidance=options.guidance, low_memory=staged,
                                   text_kv_cache=options.text_kv_cache)
    progress.stage("estimating the memory this job needs")
    decision = check_fits(plan, footprint, settings)
    free = f", {decision.free / 1024**3:.1f} GB free" if decision.free is not None else ""
    progress.note(f"estimated peak {decision.estimate.summary()}{free}")
    if decision.text_kv_switched_off:
        progress.note("text K/V recomputed every step (--no-text-kv-cache): keeping it for the run would not fit")
        options = dataclasses.replace(options, text_kv_cache=False)
    if decision.tiling_switched_on:
        progress.note("VAE tiling switched on: the whole-frame decode would not fit, a tiled one does")
        options = dataclasses.replace(options, vae_tiling=True)
    return options
