"""`train()`: one D-OPSD LoRA run, from reference images to a diffusers-loadable adapter.

Reads like the method page: cache the student and teacher features once, free the encoders, then per step roll
the student out for K steps from noise, pull it toward the teacher at every state, clip, AdamW, EMA the teacher.
`train` prepares the run (captions, data, model, features, adapters); `_train_loop` is the loop, top to bottom;
`dopsd.outputs` writes what the run leaves behind. A run may continue an earlier adapter (`init_adapter`): student
and teacher then start from its weights instead of the base model's, and the report says what it kept of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from dopsd.callbacks import StepState, TrainerCallback, TrainerControl
from dopsd.captioning import with_auto_captions
from dopsd.checkpoint import (
    TrainerState,
    dataset_digest,
    load_checkpoint,
    random_state_from_json,
    random_state_to_json,
    save_checkpoint,
)
from dopsd.config import DOPSDConfig
from dopsd.data import (
    ConceptDataset,
    DataError,
    buckets_for_resolution,
    load_concept_dataset,
    nearest_bucket,
    resize_to_cover,
    resolve_caption,
)
from dopsd.distributed import Group, global_batch_size, join_group, resume_after_restart
from dopsd.errors import ModelLoadError, TrainingCancelled
from dopsd.evaluation.report import Report
from dopsd.evaluation.retention import (
    RetentionInputs,
    RetentionUnavailable,
    add_to_report,
    load_reference,
    measure_retention,
    prepare_retention,
    unavailable,
)
from dopsd.evidence import REPORT_NAME, Evidence
from dopsd.fast_path import CompiledGraphs, compile_blocks, fp8_base_layers, restore_linear_layers
from dopsd.full_weights import (
    attach_full_weights,
    detach_full_weights,
    full_weights_of,
    gathered,
    load_optimizer_state,
    optimizer_state,
)
from dopsd.lora import (
    LORA_WEIGHT_NAME,
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    AdapterFile,
    AdapterParameters,
    active_adapter,
    adapter_state,
    add_adapters,
    ema_update,
    load_adapter_state,
    make_lora_config,
    needs_teacher_adapter,
    read_adapter_file,
    remove_adapters,
    start_from,
    student_parameters,
    teacher_adapter_for,
    teacher_parameters,
)
from dopsd.lora_extraction import ExtractedLora, extract_lora
from dopsd.models.base import Cond, ModelFamily
from dopsd.models.loading import load_family_for
from dopsd.outputs import (
    CONFIG_FILE,
    TRANSFORMER_FOLDER,
    run_metrics,
    write_adapter,
    write_metrics,
    write_other_formats,
    write_transformer,
)
from dopsd.presets import get_preset
from dopsd.rollout import distillation_rollout, rollout_sigmas, teacher_student_gap
from dopsd.sampling import SampleRenderer, SampleSet


logger = logging.getLogger(__name__)
T = TypeVar("T")

GAP_SEED_OFFSET = 1_000_003  # held-out noise for the gap metric never coincides with training noise
MAX_GAP_PAIRS = 8
FEATURE_CHUNK = 8  # captions (or prompts) encoded per batch: 64 images with several captions each stay in memory


@dataclass(frozen=True)
class RunWarning:
    """A stage after training that failed (`report`, `gap`, `samples`, `formats`): the run kept its adapter and
    what the other stages made, and says what is missing and why."""

    stage: str
    message: str


@dataclass(frozen=True)
class TrainingResult:
    """Where a finished run put its outputs, its headline metrics, and the stages after training that failed."""

    output_dir: Path
    adapter_path: Path
    metrics: dict[str, Any]
    warnings: tuple[RunWarning, ...] = ()


@dataclass
class _AfterTraining:
    """Runs the stages that follow the written adapter; a stage that fails becomes a `RunWarning` (logged with its
    traceback) instead of failing a run whose weights are already safe. Only the trainer's own work goes through
    here: a callback's exception (a stop, a lost lease, a storage outage) still ends the run."""

    warnings: list[RunWarning] = field(default_factory=list)

    def attempt(self, stage: str, what: str, work: Callable[[], T]) -> T | None:
        """`work()`, or None (and a warning naming `what` could not be done) when it raises."""
        try:
            return work()
        except Exception as exc:
            message = f"{what} failed after training ({type(exc).__name__}: {exc}); the adapter is kept"
            logger.warning("%s", message, exc_info=True)
            self.warnings.append(RunWarning(stage, message[:1000]))
            return None


@dataclass
class _Pair:
    item: int
    bucket: tuple[int, int]
    student: Cond
    teacher: Cond


def resolve_device(config: DOPSDConfig) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype of a run: CUDA when present; bf16 there unless off or the preset is fp32."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    wanted = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and get_preset(config.preset).dtype == "bfloat16"
    )
    bf16 = use_cuda and wanted
    return device, (torch.bfloat16 if bf16 else torch.float32)


def train(
    config: DOPSDConfig,
    callbacks: Sequence[TrainerCallback] = (),
    *,
    family: ModelFamily | None = None,
    dataset: ConceptDataset | None = None,
) -> TrainingResult:
    """Trains a student LoRA with D-OPSD and writes adapter, config, metrics and samples to `output_dir`.

    `config` is taken as it is (a resolved `DOPSDConfig`). `family` lets a long-lived worker pass an already loaded
    model (its adapters are removed again at the end); `dataset` lets a caller pass images it already validated.
    Raises `TrainingCancelled` when a callback stops the run (after checkpointing), `DataError` for bad input,
    `CheckpointError` for a bad resume. Once the adapter is written, a stage that fails (the report, the gap, the
    final samples, the format conversion) does not raise: it is in `TrainingResult.warnings`.

    With `num_processes` > 1 this is one rank of a launched group (`dopsd.distributed`, docs/distributed.md):
    every rank calls it alike and trains its share of each step; rank 0 alone talks to `callbacks`, checkpoints,
    samples, evaluates and writes the outputs, and every rank returns its result (or raises its error).
    """
    with join_group(config, resolve_device(config)[0]) as group:
        return group.share_outcome(
            lambda: _train(resume_after_restart(config), callbacks if group.is_main else (), group, family, dataset)
        )


def _train(
    config: DOPSDConfig,
    callbacks: Sequence[TrainerCallback],
    group: Group,
    family: ModelFamily | None,
    dataset: ConceptDataset | None,
) -> TrainingResult:
    cfg = config
    device, dtype = resolve_device(cfg)
    device = group.device_for(device)
    init = _init_adapter(cfg)  # before anything loads: a wrong file fails at once
    if dataset is None and cfg.default_caption is None:  # rank 0 writes the captions, every rank trains on them
        cfg = group.on_main(lambda: with_auto_captions(cfg, device=device, dtype=dtype))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if dataset is None:
        dataset = load_concept_dataset(
            cfg.instance_data_dir,
            trigger=cfg.trigger,
            default_caption=cfg.default_caption,
            captions=cfg.captions,
            min_side=get_preset(cfg.preset).min_image_side,
        )
    if family is None:
        family = load_family_for(cfg, device=device, dtype=dtype)
    load_s = time.perf_counter() - t_start

    # Features, computed once per (image, caption) and per prompt (the evaluation's too); the encoders then leave.
    pairs = _encode_pairs(cfg, family, dataset)
    renderer = _sample_renderer(cfg, family, dataset, pairs)
    evidence = Evidence(cfg, family, dataset)
    retention = _retention_inputs(cfg, family) if evidence.reports else None
    family.release_encoders()

    # The gate, on the base model: a teacher that cannot see the concept cannot teach it, so fail before step 1
    # (a resumed run passed it already).
    if not cfg.resume_from:
        group.on_main(lambda: evidence.check_teacher(callbacks))

    # Adapters: the student (trained) and, for an EMA teacher, its copy; both start as the base model, or both as
    # the earlier adapter a continued run starts from (with its rank, alpha and target modules; a frozen teacher is
    # then that adapter, kept as it was; `init_teacher: base` leaves the teacher at the base model). A resumed run
    # takes both from its checkpoint instead.
    # With `finetune: full` the student is every weight of the transformer and the EMA teacher a whole copy
    # (`dopsd.full_weights`); the LoRA config then describes the adapter extracted from the result.
    torch.manual_seed(cfg.seed)
    targets = init.target_modules if init is not None else family.lora_target_modules
    full = cfg.finetune == "full"
    if full:
        extract = cfg.extract_lora_rank or cfg.rank
        lora_config = make_lora_config(extract, float(extract), 0.0, targets)
        attach_full_weights(family.pipeline, with_teacher=cfg.teacher_mode == "ema", shard=group.distributed)
    else:
        lora_config = make_lora_config(cfg.rank, cfg.lora_alpha, cfg.lora_dropout, targets)
        from_adapter = cfg.init_adapter is not None and cfg.init_teacher == "adapter"
        add_adapters(
            family.transformer,
            lora_config,
            with_teacher=needs_teacher_adapter(cfg.teacher_mode, from_adapter=from_adapter),
        )
    if cfg.fp8_base:
        _check_fp8(device)
        fp8_base_layers(family.transformer, emulate=device.type != "cuda")
    if cfg.compile_blocks:
        compile_blocks(family, cfg.compile_backend)
    try:
        if init is not None and not cfg.resume_from:
            start_from(family.transformer, init.state, teacher=cfg.init_teacher == "adapter")
        return _train_loop(
            cfg, family, dataset, pairs, renderer, evidence, lora_config.to_dict(), callbacks, out, load_s,
            init=init, retention=retention, group=group,
        )  # fmt: skip
    finally:
        restore_linear_layers(family.transformer)
        if full:
            detach_full_weights(family.transformer)
        else:
            remove_adapters(family.transformer)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _check_fp8(device: torch.device) -> None:
    """Refuses `fp8_base` on a GPU without FP8 matmuls (compute capability below 8.9: before Ada and Hopper)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ModelLoadError(f"fp8_base needs a GPU of compute capability 8.9 or more; this one is {major}.{minor}")


def _init_adapter(cfg: DOPSDConfig) -> AdapterFile | None:
    """The earlier adapter the run continues (`init_adapter`), checked against the run's LoRA shape: its rank and
    alpha are the file's, and a config that asks for others is a `DataError` that says so. A resumed run takes its
    weights from the checkpoint, so it goes on without the file when the file is gone."""
    if cfg.init_adapter is None or (cfg.resume_from and not Path(cfg.init_adapter).exists()):
        return None
    init = read_adapter_file(cfg.init_adapter, family=get_preset(cfg.preset).family)
    if (cfg.rank, cfg.lora_alpha) != (init.rank, init.alpha):
        raise DataError(
            "init_adapter_mismatch",
            f"the adapter to continue has rank {init.rank} and alpha {init.alpha:g}, but this run asks for rank "
            f"{cfg.rank} and alpha {cfg.lora_alpha:g}; a continued run keeps the adapter's shape: set rank "
            f"{init.rank} and alpha {init.alpha:g} (dopsd train takes them from the file when not given)",
            file=str(init.path),
        )
    return init


def _retention_inputs(cfg: DOPSDConfig, family: ModelFamily) -> RetentionInputs | str | None:
    """What the report's retention section renders again (encoded now, while the encoders are loaded): the final
    samples of the run whose adapter this one continues; the reason in words when they are not at hand; `None`
    for a run that continues nothing."""
    if cfg.init_adapter is None:
        return None
    if not Path(cfg.init_adapter).exists():
        return "the earlier adapter's files were not at hand when this run resumed"
    try:
        reference = load_reference(cfg.init_adapter)
    except RetentionUnavailable as exc:
        return str(exc)
    return prepare_retention(family, reference, cfg.student_max_sequence_length)


def _init_record(cfg: DOPSDConfig, init: AdapterFile | None) -> dict[str, Any] | None:
    """What `metrics.json` says of the adapter a run continued: where from (the earlier run's folder name, a
    service job's id), after how many steps of its own, with which rank and alpha."""
    if cfg.init_adapter is None:
        return None
    path = Path(cfg.init_adapter)
    return {
        "source": (path if path.is_dir() or not path.suffix else path.parent).name,
        "steps": init.steps if init is not None else None,
        "rank": cfg.rank,
        "alpha": cfg.lora_alpha,
    }


def _encode_student(family: ModelFamily, texts: Sequence[str], max_length: int) -> list[Cond]:
    """The student's text features of `texts`, `FEATURE_CHUNK` at a time."""
    return [
        cond
        for i in range(0, len(texts), FEATURE_CHUNK)
        for cond in family.encode_student(texts[i : i + FEATURE_CHUNK], max_length)
    ]


def _encode_pairs(cfg: DOPSDConfig, family: ModelFamily, dataset: ConceptDataset) -> list[_Pair]:
    """Every (image, caption) pair of the dataset with its bucket, student features and teacher context."""
    buckets = buckets_for_resolution(cfg.resolution)
    item_buckets = [nearest_bucket(it.image.width, it.image.height, buckets) for it in dataset.items]
    captions = sorted({c for _, c in dataset.pairs})
    student = dict(zip(captions, _encode_student(family, captions, cfg.student_max_sequence_length), strict=True))
    return [
        _Pair(
            item=i,
            bucket=item_buckets[i],
            student=student[caption],
            teacher=family.encode_teacher(
                resize_to_cover(dataset.items[i].image, item_buckets[i]),
                caption,
                text_max_length=cfg.student_max_sequence_length,
                context_max_length=cfg.teacher_max_sequence_length,
            ),
        )
        for i, caption in dataset.pairs
    ]


def _sample_renderer(
    cfg: DOPSDConfig, family: ModelFamily, dataset: ConceptDataset, pairs: list[_Pair]
) -> SampleRenderer:
    """The renderer of the run's samples: the validation prompts (encoded now, while the encoders are loaded) and
    each training image's teacher context."""
    prompts = [resolve_caption(p, cfg.trigger) for p in cfg.validation_prompts]
    first_pair_of_item = {p.item: p for p in reversed(pairs)}
    return SampleRenderer(
        family,
        prompts=prompts,
        prompt_conds=_encode_student(family, prompts, cfg.student_max_sequence_length),
        teacher_samples=[(dataset.items[i].name, first_pair_of_item[i].teacher) for i in range(len(dataset.items))],
        seeds=cfg.sample_seeds,
        width=cfg.resolution,
        height=cfg.resolution,
        num_steps=cfg.sample_steps,
    )


def _sigmas(cfg: DOPSDConfig, family: ModelFamily, bucket: tuple[int, int]) -> list[float]:
    """The roll-out schedule of a bucket (`rollout_schedule`)."""
    width, height = bucket
    return rollout_sigmas(family, cfg.rollout_schedule, width=width, height=height, native_steps=cfg.sample_steps)


class _GapProbe:
    """The teacher-student gap on held-out noise: fixed seeds, never drawn from the training generator, over at
    most `MAX_GAP_PAIRS` training pairs spread over the dataset.

    The teacher it reads is the base model with the training image in context (adapters off), whatever the run's
    teacher mode: a fixed target, as the report's held-out gap uses, so `before` and `after` compare although the
    EMA teacher moves, and a run that continues an earlier adapter starts at exactly the gap that run ended with.
    """

    def __init__(self, cfg: DOPSDConfig, family: ModelFamily, pairs: list[_Pair]):
        self.cfg, self.family, self.teacher_adapter = cfg, family, None
        probed = pairs[:: max(1, len(pairs) // MAX_GAP_PAIRS)][:MAX_GAP_PAIRS]
        self.cases = [
            (p, torch.randn((1, *family.latent_shape(*p.bucket)), generator=torch.Generator().manual_seed(seed)))
            for seed in range(GAP_SEED_OFFSET, GAP_SEED_OFFSET + cfg.gap_eval_seeds)
            for p in probed
        ]
        self.definition = (
            "mean x0 MSE between the student and the base model with the training image in context (the teacher "
            "before any step) along the student's roll-out, "
            f"{cfg.gap_eval_seeds} held-out noise seeds x {len(probed) if self.cases else 0} training pairs"
        )

    def measure(self) -> float | None:
        """The mean gap over the held-out cases (`None` without any), LoRA dropout off."""
        if not self.cases:
            return None
        self.family.transformer.eval()
        by_bucket: dict[tuple[int, int], list[tuple[_Pair, torch.Tensor]]] = {}
        for p, noise in self.cases:
            by_bucket.setdefault(p.bucket, []).append((p, noise))
        values = []
        for bucket, cases in by_bucket.items():
            gap = teacher_student_gap(
                self.family,
                noises=[n.to(self.family.device) for _, n in cases],
                student_conds=[p.student for p, _ in cases],
                teacher_conds=[p.teacher for p, _ in cases],
                sigmas=_sigmas(self.cfg, self.family, bucket),
                teacher_adapter=self.teacher_adapter,
            )
            values.extend([gap] * len(cases))
        return sum(values) / len(values)


class _Batches:
    """Micro-batches of training pairs: a random pair, then more from its bucket (one latent shape per batch)."""

    def __init__(self, pairs: list[_Pair], batch_size: int, seed: int) -> None:
        self.pairs, self.batch_size, self.rng = pairs, batch_size, random.Random(seed)
        self.by_bucket: dict[tuple[int, int], list[_Pair]] = {}
        for p in pairs:
            self.by_bucket.setdefault(p.bucket, []).append(p)

    def next(self) -> list[_Pair]:
        """The next micro-batch."""
        first = self.rng.choice(self.pairs)
        same = self.by_bucket[first.bucket]
        return [first] + [self.rng.choice(same) for _ in range(self.batch_size - 1)]


@dataclass
class _Run:
    """What the loop's side tasks (checkpoints, samples, resume) need of the run."""

    cfg: DOPSDConfig
    transformer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    noise_rng: torch.Generator
    batches: _Batches
    renderer: SampleRenderer
    callbacks: Sequence[TrainerCallback]
    out: Path
    dataset_sha256: str
    has_teacher: bool

    def resume(self) -> TrainerState:
        """Restores adapters, optimizer and every RNG from `resume_from`, so the run goes on exactly as an
        uninterrupted one would; refuses a checkpoint of another run (`CheckpointError`)."""
        assert self.cfg.resume_from is not None
        ckpt = load_checkpoint(self.cfg.resume_from, self.cfg, self.dataset_sha256)
        load_adapter_state(self.transformer, STUDENT_ADAPTER, ckpt.student)
        if ckpt.teacher is not None and self.has_teacher:
            load_adapter_state(self.transformer, TEACHER_ADAPTER, ckpt.teacher)
        full = full_weights_of(self.transformer)
        if full is not None:
            load_optimizer_state(full.student, self.optimizer, ckpt.optimizer)
        else:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.noise_rng.set_state(ckpt.noise_rng)
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)
        self.batches.rng.setstate(random_state_from_json(ckpt.state.data_rng))
        logger.info("resumed from %s at step %d", ckpt.path, ckpt.state.step)
        return ckpt.state

    def optimizer_state(self) -> torch.optim.Optimizer | dict[str, Any]:
        """What a checkpoint keeps of the optimizer: a full fine-tune's state by parameter name, whole (gathered
        from every rank: all ranks call this), so it resumes on any number of processes; a LoRA's as it is."""
        full = full_weights_of(self.transformer)
        return self.optimizer if full is None else optimizer_state(full.student, self.optimizer)

    def checkpoint(self, state: TrainerState, optimizer: torch.optim.Optimizer | dict[str, Any]) -> Path:
        """Writes a checkpoint of `state` (atomically) and tells the callbacks."""
        state.data_rng = random_state_to_json(self.batches.rng)
        path = save_checkpoint(
            self.out / "checkpoints",
            state=state,
            student=adapter_state(self.transformer, STUDENT_ADAPTER),
            teacher=adapter_state(self.transformer, TEACHER_ADAPTER) if self.has_teacher else None,
            optimizer=optimizer,
            noise_rng=self.noise_rng,
            config=self.cfg,
            keep=self.cfg.checkpoints_total_limit,
            dataset_sha256=self.dataset_sha256,
        )
        for cb in self.callbacks:
            cb.on_checkpoint(state.step, path)
        return path

    def render(self, step: int, final: bool = False) -> SampleSet:
        """Renders the sample images of `step`."""
        self.transformer.eval()
        return self.renderer.render(self.out / "samples" / f"step-{step:08d}", step, final=final)

    def announce(self, samples: SampleSet) -> None:
        """Tells the callbacks about rendered samples."""
        for cb in self.callbacks:
            cb.on_samples(samples)

    def samples(self, step: int, final: bool = False) -> SampleSet:
        """Renders the sample images of `step` and tells the callbacks."""
        samples = self.render(step, final=final)
        self.announce(samples)
        return samples


@dataclass
class _Checkpointing:
    """Gradient checkpointing (activations recomputed in the backward pass: less memory, slower steps), by the
    run's `gradient_checkpointing`: on, off, or unset (`auto`): off, until a step runs out of GPU memory without it;
    that step is then run again, on the same samples and noise, with it on, and it stays on. With several
    processes `auto` is on from the start on a GPU (one rank cannot retry a step while the others wait in its
    collectives)."""

    transformer: torch.nn.Module
    policy: str  # "on", "off" or "auto"
    enabled: bool
    turned_on_at_step: int | None = None

    @classmethod
    def for_run(cls, cfg: DOPSDConfig, transformer: torch.nn.Module, *, cuda: bool, group: Group) -> _Checkpointing:
        """The run's policy, applied to the transformer."""
        if cfg.gradient_checkpointing is not None:
            policy, enabled = ("on", True) if cfg.gradient_checkpointing else ("off", False)
        else:
            policy, enabled = "auto", cuda and group.distributed
        if enabled:
            transformer.enable_gradient_checkpointing()  # type: ignore[operator]
        elif getattr(transformer, "is_gradient_checkpointing", False):  # a cached model, from an earlier run
            transformer.disable_gradient_checkpointing()  # type: ignore[operator]
        return cls(transformer=transformer, policy=policy, enabled=enabled)

    def run_step(
        self, rollouts: Callable[[], float], run: _Run, optimizer: torch.optim.Optimizer, *, step: int
    ) -> float:
        """The step's roll-outs (gradients zeroed first); under `auto`, one that runs out of memory without
        checkpointing runs again with it, from the same random states."""
        retry = self.policy == "auto" and not self.enabled
        states = _RandomStates.of(run) if retry else None
        optimizer.zero_grad(set_to_none=True)
        try:
            return rollouts()
        except torch.OutOfMemoryError:
            if states is None:
                raise
            logger.warning("step %d ran out of memory without gradient checkpointing; it runs again with it", step)
        # Out of the handler, so its traceback (and the activations it holds) is gone before the retry.
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.transformer.enable_gradient_checkpointing()  # type: ignore[operator]
        self.enabled, self.turned_on_at_step = True, step
        assert states is not None
        states.restore(run)
        return rollouts()

    def summary(self) -> dict[str, Any]:
        """What `metrics.json` says of checkpointing: the policy, whether it ended on, the step that turned it on."""
        return {"policy": self.policy, "enabled": self.enabled, "turned_on_at_step": self.turned_on_at_step}


@dataclass(frozen=True)
class _RandomStates:
    """The random states a step draws from (its samples, its noise, dropout), to run the step again alike."""

    data: Any
    noise: torch.Tensor
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None

    @classmethod
    def of(cls, run: _Run) -> _RandomStates:
        """The states now."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(run.batches.rng.getstate(), run.noise_rng.get_state(), torch.get_rng_state(), cuda)

    def restore(self, run: _Run) -> None:
        """Puts the states back."""
        run.batches.rng.setstate(self.data)
        run.noise_rng.set_state(self.noise)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)


def _clip_gradients(params: AdapterParameters, max_norm: float) -> float:
    """Clips the student's gradient to `max_norm` (0: no clipping) and returns its norm before clipping (over every
    rank's shard where the student is sharded)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor: the norm of every shard together
    return float(full_tensor() if full_tensor is not None else norm)


def _ask_callbacks(callbacks: Sequence[TrainerCallback], state: StepState) -> TrainerControl:
    """Reports a step to every callback; their answers combined (any stop, any save)."""
    control = TrainerControl()
    for cb in callbacks:
        answer = cb.on_step_end(state)
        if answer is not None:
            control.should_stop |= answer.should_stop
            control.should_save |= answer.should_save
    return control


def _train_loop(
    cfg: DOPSDConfig,
    family: ModelFamily,
    dataset: ConceptDataset,
    pairs: list[_Pair],
    renderer: SampleRenderer,
    evidence: Evidence,
    lora_metadata: dict[str, Any],
    callbacks: Sequence[TrainerCallback],
    out: Path,
    load_s: float,
    *,
    init: AdapterFile | None,
    retention: RetentionInputs | str | None,
    group: Group,
) -> TrainingResult:
    # Optimizer: AdamW over the student's parameters (its LoRA, or every weight) and nothing else, at a constant
    # rate (as released).
    transformer = family.transformer
    params, teacher_params = _trained_parameters(transformer)
    full = full_weights_of(transformer)
    sharded = full is not None and full.sharded  # FSDP2 averages the gradients itself, and no rank holds it all
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.adam_weight_decay,
        fused=family.device.type == "cuda" and not sharded,
    )
    checkpointing = _Checkpointing.for_run(cfg, transformer, cuda=family.device.type == "cuda", group=group)
    from_adapter = cfg.init_adapter is not None and cfg.init_teacher == "adapter"
    teacher_adapter = teacher_adapter_for(cfg.teacher_mode, from_adapter=from_adapter)
    gap = _GapProbe(cfg, family, pairs)
    run = _Run(
        cfg=cfg,
        transformer=transformer,
        optimizer=optimizer,
        noise_rng=torch.Generator().manual_seed(cfg.seed),
        batches=_Batches(pairs, cfg.train_batch_size * group.world_size, cfg.seed),  # every rank's, see the loop
        renderer=renderer,
        callbacks=callbacks,
        out=out,
        dataset_sha256=dataset_digest(dataset),
        has_teacher=bool(teacher_params),
    )

    # Start, or resume where a checkpoint left off. A fresh run measures the gap it is about to close.
    if cfg.resume_from:
        state = run.resume()
    else:
        state = TrainerState(step=0, data_rng=None)
        with _whole(family, group):
            state.metrics["gap_before"] = group.on_main(gap.measure)
        state.metrics["init_adapter"] = _init_record(cfg, init)
    if not sharded:  # every rank starts from rank 0's adapters (sharded copies of the same base start alike)
        group.broadcast_parameters(params + teacher_params)

    def sample_and_check(step: int) -> None:  # rank 0's work; the others wait for it
        run.samples(step)
        student = adapter_state(transformer, STUDENT_ADAPTER) if cfg.keep == "best" else {}
        evidence.quick_check(step, student, callbacks)

    # The loop. One optimizer step: roll the student out from fresh noise along the schedule and pull its
    # prediction toward the teacher's at every state (accumulated over micro-batches), clip, AdamW, then move the
    # EMA teacher a (1 - decay) step toward the student. With several processes each micro-step is drawn for all
    # ranks alike (pairs and noise), each rank trains on items rank, rank + W, ... of it, and the ranks average their
    # gradients before the clip: every rank then takes the same AdamW and EMA step, as one process would.
    total = cfg.max_train_steps
    for cb in callbacks:
        cb.on_train_begin(total, state.step)
    t_loop = time.perf_counter()
    start_step = state.step
    compiled = CompiledGraphs(cfg.compile_blocks)

    def rollouts() -> float:  # the step's roll-outs and backward passes, over its micro-batches
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = run.batches.next()
            shape = (len(batch), *family.latent_shape(*batch[0].bucket))
            batch, noise = group.share(batch, torch.randn(shape, generator=run.noise_rng))
            noise = noise.to(family.device)
            loss = distillation_rollout(
                family,
                noise=noise,
                student_conds=[p.student for p in batch],
                teacher_conds=[p.teacher for p in batch],
                sigmas=_sigmas(cfg, family, batch[0].bucket),
                teacher_adapter=teacher_adapter,
                loss_space=cfg.loss_space,
                loss_scale=1.0 / cfg.gradient_accumulation_steps,
            )
            step_loss += loss / cfg.gradient_accumulation_steps
        return step_loss

    while state.step < total:
        transformer.train()  # LoRA dropout (if any) acts on the student only; the teacher adapter has none
        compiled.start()
        step_loss = checkpointing.run_step(rollouts, run, optimizer, step=state.step + 1)
        step_loss = group.mean(step_loss) if sharded else group.average_gradients(params, step_loss)
        grad_norm = _clip_gradients(params, cfg.max_grad_norm)
        optimizer.step()
        if teacher_params and cfg.teacher_mode == "ema":  # a frozen teacher adapter (a continued run's) stays
            ema_update(teacher_params, params, cfg.ema_decay)
        compiled.end(first=state.step == start_step)
        state.step += 1
        state.loss_history.append(step_loss)
        state.grad_norm_history.append(grad_norm)

        # Report the step; the callbacks may ask for a checkpoint, or to stop (after one). Then the cadences.
        elapsed = time.perf_counter() - t_loop
        control = group.control(partial(
            _ask_callbacks,
            callbacks,
            StepState(
                step=state.step,
                total_steps=total,
                loss=step_loss,
                learning_rate=cfg.learning_rate,
                elapsed_s=elapsed,
                eta_s=elapsed / (state.step - start_step) * (total - state.step),
                grad_norm=grad_norm,
            ),
        ))  # fmt: skip
        due = cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0 and state.step < total
        if control.should_save or control.should_stop or due:
            optimizer_now = run.optimizer_state()  # of the student as it trains (sharded, where it is)
            with _whole(family, group):
                path = group.on_main(partial(run.checkpoint, state, optimizer_now))
            if control.should_stop:
                raise TrainingCancelled(state.step, str(path))
        if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < total:
            with _whole(family, group):
                group.on_main(partial(sample_and_check, state.step))

    # Outputs. The adapter (and config.json) first: what follows (the report, the gap, the final samples, the
    # format conversion) can still fail, and a failure there leaves the run with its adapter and a warning instead
    # of losing the trained weights. metrics.json last. Rank 0 alone: the others wait for its result, once every
    # rank has shown the digests of its adapters (identical replicas, or a warning).
    train_s = time.perf_counter() - t_loop
    replicas = (
        None if sharded else group.replica_digests({"student": params.named(), "teacher": teacher_params.named()})
    )
    with _whole(family, group):
        if not group.main_only():
            return cast(TrainingResult, group.main_result())
        return _outputs(
            cfg, family, dataset, evidence, gap, run, state, lora_metadata, callbacks, out, load_s,
            train_s=train_s, start_step=start_step, retention=retention, group=group, replicas=replicas,
            sharded=sharded, compiled=compiled.summary(cfg.compile_backend),
            checkpointing_summary=checkpointing.summary(),
        )  # fmt: skip


def _whole(family: ModelFamily, group: Group) -> contextlib.AbstractContextManager[None]:
    """Around work rank 0 does alone: for a sharded full fine-tune, every rank gathers the whole student and teacher
    for it (`dopsd.full_weights.gathered`); otherwise nothing."""
    full = full_weights_of(family.transformer)
    if full is None:
        return contextlib.nullcontext()
    return gathered(full, is_main=group.is_main)


def _outputs(
    cfg: DOPSDConfig,
    family: ModelFamily,
    dataset: ConceptDataset,
    evidence: Evidence,
    gap: _GapProbe,
    run: _Run,
    state: TrainerState,
    lora_metadata: dict[str, Any],
    callbacks: Sequence[TrainerCallback],
    out: Path,
    load_s: float,
    *,
    train_s: float,
    start_step: int,
    retention: RetentionInputs | str | None,
    group: Group,
    replicas: dict[str, list[str]] | None,
    sharded: bool,
    compiled: dict[str, Any] | None,
    checkpointing_summary: dict[str, Any],
) -> TrainingResult:
    """Rank 0's outputs after the last step: the adapter (or a full fine-tune's transformer) first, then the report,
    the gap, the final samples, the other formats and `metrics.json`, each stage after the weights allowed to fail
    into a warning."""
    transformer = family.transformer
    transformer.eval()
    extraction = None
    if cfg.finetune == "full":
        adapter_path, extraction = _write_full_outputs(out, family, lora_metadata, cfg, state.step)
    else:
        student_state = adapter_state(transformer, STUDENT_ADAPTER)
        adapter_path = write_adapter(out, family, student_state, lora_metadata, cfg, state.step)
    adapter_step = state.step
    after = _AfterTraining()
    # The report judges the adapter the run keeps: the last one, or (`keep: best`) an earlier sample step's that
    # did better, which then replaces it.
    report = after.attempt("report", "the evaluation report", lambda: evidence.final_report(out, state.step))
    kept = evidence.kept_state(report)
    if kept is not None:
        kept_step, kept_student = kept
        (out / REPORT_NAME).unlink(missing_ok=True)  # it judged the adapter about to be replaced

        def keep_best() -> Report | None:
            nonlocal adapter_path, adapter_step
            load_adapter_state(transformer, STUDENT_ADAPTER, kept_student)
            adapter_path = write_adapter(out, family, kept_student, lora_metadata, cfg, kept_step)
            adapter_step = kept_step
            logger.info("kept the adapter of step %d (keep: best)", kept_step)
            return evidence.final_report(out, kept_step)

        report = after.attempt("report", "keeping the best step's adapter and its report", keep_best)
    if report is not None and retention is not None:
        kept_report = report
        report = (
            after.attempt(
                "retention", "the retention check", lambda: _with_retention(kept_report, retention, cfg, family, out)
            )
            or report
        )
    if report is not None:
        for cb in callbacks:
            cb.on_evaluation(report)
    state.metrics["gap_after"] = after.attempt("gap", "the teacher-student gap", gap.measure)
    final_samples = after.attempt("samples", "the final samples", lambda: run.render(state.step, final=True))
    if final_samples is not None:
        run.announce(final_samples)
    if adapter_path.name == LORA_WEIGHT_NAME:  # a full fine-tune without an extracted LoRA has none to convert
        after.attempt(
            "formats",
            f"the conversion to {cfg.output_formats}",
            lambda: write_other_formats(adapter_path, cfg, family),
        )
    metrics = run_metrics(
        steps=state.step,
        loss=state.loss_history,
        grad_norm=state.grad_norm_history,
        gap_before=state.metrics.get("gap_before"),
        gap_after=state.metrics["gap_after"],
        gap_definition=gap.definition,
        timing_s={"load": load_s, "train": train_s, "per_step": train_s / max(1, state.step - start_step)},
        captions={it.name: list(it.captions) for it in dataset.items},
        samples=[str(p.path.relative_to(out)) for p in final_samples.images] if final_samples else [],
    )
    metrics["kept_step"] = adapter_step
    metrics["finetune"] = cfg.finetune
    metrics["compile"] = compiled
    metrics["gradient_checkpointing"] = checkpointing_summary
    if extraction is not None:
        metrics["lora_extraction"] = extraction.summary()
    metrics["init_adapter"] = state.metrics.get("init_adapter")
    if report is not None and report.retention is not None:
        metrics["retention"] = {"verdict": report.retention["verdict"], "summary": report.retention["summary"]}
    metrics["evaluation"] = (
        None
        if report is None
        else {
            "concept": report.concept.verdict,
            "few_step_quality": report.few_step_quality.verdict,
            "seconds": report.cost.get("seconds"),
        }
    )
    if evidence.teacher_check is not None:
        metrics["teacher_check"] = evidence.teacher_check.to_dict()
    metrics["distributed"] = group.summary(
        replicas, batch=global_batch_size(group.world_size, cfg.train_batch_size, cfg.gradient_accumulation_steps)
    )
    metrics["distributed"]["sharded"] = sharded
    if metrics["distributed"]["replicas_identical"] is False:
        after.warnings.append(RunWarning("distributed", "the ranks' adapters differ (metrics.json: replica_sha256)"))
    metrics["warnings"] = [asdict(w) for w in after.warnings]
    write_metrics(out, metrics)
    for cb in callbacks:
        cb.on_train_end(out)
    return TrainingResult(out, adapter_path, metrics, tuple(after.warnings))


def _trained_parameters(transformer: torch.nn.Module) -> tuple[AdapterParameters, AdapterParameters]:
    """The student's parameters (all AdamW sees) and the EMA teacher's tensors, paired by name: the two LoRA
    adapters, or with full weights every parameter and its EMA copy (none for a frozen or live teacher)."""
    full = full_weights_of(transformer)
    if full is None:
        return student_parameters(transformer), teacher_parameters(transformer)
    teacher = full.teacher.named_parameters() if full.teacher is not None else ()
    return AdapterParameters(full.student.named_parameters()), AdapterParameters(teacher)


def _write_full_outputs(
    out: Path, family: ModelFamily, lora_metadata: dict[str, Any], cfg: DOPSDConfig, steps: int
) -> tuple[Path, ExtractedLora | None]:
    """A full fine-tune's outputs, before anything else can fail: the transformer in diffusers' format
    (`transformer/`) and, with `extract_lora_rank`, its change to the base as a LoRA. Returns the LoRA file (or the
    transformer folder without one) and the extraction."""
    full = full_weights_of(family.transformer)
    assert full is not None
    base = full.base_tensors()
    write_transformer(out, full.student, base)
    if cfg.extract_lora_rank is None:
        cfg.save(out / CONFIG_FILE)
        return out / TRANSFORMER_FOLDER, None
    extraction = extract_lora(full.student, base, family.lora_target_modules, cfg.extract_lora_rank)
    return write_adapter(out, family, extraction.state, lora_metadata, cfg, steps), extraction


def _with_retention(
    report: Report, retention: RetentionInputs | str, cfg: DOPSDConfig, family: ModelFamily, out: Path
) -> Report:
    """The report with its retention section (what the kept adapter kept of the one the run continued), also
    written into `report.json`."""
    if isinstance(retention, str):
        section = unavailable(retention)
    else:
        folder = cfg.eval_embedding_model or get_preset(cfg.preset).embedding_model
        embedder = None
        if folder:
            from dopsd.evaluation.embedding import load_embedder

            embedder = load_embedder(folder, device=family.device)
        section = measure_retention(family, retention, embedder=embedder)
    add_to_report(out / REPORT_NAME, section)
    return dataclasses.replace(report, retention=section)


__all__ = ["RunWarning", "TrainingResult", "active_adapter", "resolve_device", "train"]
