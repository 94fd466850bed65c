"""Full fine-tuning (`finetune: full`) on the tiny preset: every transformer weight trained with a whole EMA copy as
the teacher; the output is the transformer in diffusers' format (it loads with `from_pretrained`) and, when asked,
its change to the base as a LoRA that loads like any adapter. A stopped run resumes to the uninterrupted weights, a
2-process run trains what one process trains on the same global batch, and a worker's cached model leaves a run as
it came."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dopsd import DOPSDConfig, StepState, TrainerCallback, TrainerControl, train
from dopsd.config import validation_errors
from dopsd.errors import CheckpointError, TrainingCancelled
from dopsd.full_weights import full_weights_of
from dopsd.lora import read_adapter_file
from dopsd.lora_extraction import extract_lora
from dopsd.models.loading import load_family_for
from dopsd.outputs import TRANSFORMER_FOLDER
from tests.dopsd.test_distributed import cli_args, cli_env, one_thread, run_settings
from tests.pace import PACE


LEARNING_RATE = 1e-4  # full fine-tuning moves every weight: a LoRA's 2e-3 would wreck the tiny model in a few steps
# A resumed run against the uninterrupted one: the largest difference of any weight, as a fraction of the learning
# rate. Measured: a run stopped at step 4 and resumed ends bit for bit on the uninterrupted weights.
ATOL = 0.05 * LEARNING_RATE
# Two processes, their student and teacher sharded with FSDP2, against one: the distance between the two runs'
# weights as a share of how far the one-process run moved from the base. Measured (fp32, one thread per process, 6
# steps): 0.0029; after the first step the weights agree within 1.2e-7. FSDP2's reduce-scatter rounds differently
# from one process's batch mean (each rank's gradient is divided before the sum), and AdamW's normalised steps
# carry that on (a weight moves about lr per step whatever its gradient's size). UPDATE_RTOL leaves a margin of 7x.
UPDATE_RTOL = 0.02


def settings(out: Path, example_dir: Path, **given: Any) -> dict[str, Any]:
    """A 6-step full fine-tune of the example concept with an extracted rank-4 LoRA, checkpoints every 3 steps (the
    LoRA runs' settings otherwise)."""
    full = {
        "finetune": "full",
        "extract_lora_rank": 4,
        "learning_rate": LEARNING_RATE,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
    }
    return run_settings(out, example_dir, **{**full, **given})


def transformer_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's `transformer/` folder."""
    return load_file(out / TRANSFORMER_FOLDER / "diffusion_pytorch_model.safetensors")


def base_family(cfg: DOPSDConfig) -> Any:
    return load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    """One uninterrupted full fine-tune, batch 2, with its report (one seed)."""
    out = tmp_path_factory.mktemp("full")
    with one_thread():
        train(DOPSDConfig.for_preset(**settings(out, example_dir, train_batch_size=2, eval_seeds=1)))
    return out


def test_a_full_fine_tune_writes_a_diffusers_transformer_and_an_adapter_of_its_change(full_run: Path) -> None:
    cfg = DOPSDConfig.load(full_run / "config.json")
    family = base_family(cfg)
    reloaded = type(family.transformer).from_pretrained(full_run, subfolder=TRANSFORMER_FOLDER)
    trained, base = reloaded.state_dict(), family.transformer.state_dict()
    assert trained.keys() == base.keys()
    changed = [name for name in base if not torch.equal(trained[name], base[name])]
    assert len(changed) > 0.9 * len(base)  # every weight is trained, not only the LoRA targets
    adapter = read_adapter_file(full_run, family=family.name)
    assert (adapter.rank, adapter.alpha) == (4, 4.0)
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["finetune"] == "full" and metrics["warnings"] == []
    extraction = metrics["lora_extraction"]
    assert extraction["rank"] == 4 and 0 < extraction["relative_error"] < 1
    assert metrics["evaluation"]["concept"] is not None  # the report judged the fine-tuned model against the base


def test_the_extracted_lora_holds_a_low_rank_change_of_its_targets_exactly(example_dir: Path) -> None:
    family = base_family(DOPSDConfig.for_preset(**settings(Path("unused"), example_dir)))
    transformer = family.transformer
    base = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    targets = family.lora_target_modules
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in targets):
                out_f, in_f = module.weight.shape
                u, v = torch.randn(out_f, 2, generator=generator), torch.randn(2, in_f, generator=generator)
                module.weight.add_(0.01 * u @ v)  # a rank-2 change
    exact = extract_lora(transformer, base, targets, rank=2)
    assert exact.relative_error < 1e-4 and exact.share_in_targets == pytest.approx(1.0)
    modules = dict(transformer.named_modules())
    for key, lora_a in exact.state.items():
        if key.endswith("lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            restored = base[f"{name}.weight"] + exact.state[f"{name}.lora_B.weight"] @ lora_a
            torch.testing.assert_close(restored, modules[name].weight, atol=1e-6, rtol=0)
    assert extract_lora(transformer, base, targets, rank=1).relative_error > 0.1  # half the spectrum is left out
    with torch.no_grad():  # a change outside the targets is what no LoRA of them holds
        next(p for n, p in transformer.named_parameters() if "norm" in n).add_(1.0)
    assert extract_lora(transformer, base, targets, rank=2).share_in_targets < 1.0


def test_a_cached_model_leaves_a_full_fine_tune_as_it_came(tmp_path: Path, example_dir: Path) -> None:
    cfg = DOPSDConfig.for_preset(**settings(tmp_path, example_dir, max_train_steps=2, checkpointing_steps=0))
    family = base_family(cfg)
    loaded = family.transformer
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in loaded.named_parameters()}
    with one_thread():
        train(cfg, family=family)
    assert family.transformer is loaded and full_weights_of(loaded) is None
    after = dict(loaded.named_parameters())
    assert all(torch.equal(after[n], t) and after[n].requires_grad == grad for n, (t, grad) in before.items())


def test_the_ema_teacher_is_a_whole_copy_that_follows_the_student(tmp_path: Path, example_dir: Path) -> None:
    def teacher_and_student(decay: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        out = tmp_path / f"decay-{decay}"
        with one_thread():
            train(DOPSDConfig.for_preset(**settings(out, example_dir, max_train_steps=4, ema_decay=decay)))
        folder = out / "checkpoints" / "step-00000003"
        return load_file(folder / "teacher.safetensors"), load_file(folder / "student.safetensors")

    teacher, student = teacher_and_student(0.0)  # an EMA of decay 0 is the student after every step
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in student)
    teacher, student = teacher_and_student(0.5)
    assert any(not torch.equal(teacher[k], student[k]) for k in student)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: StepState) -> TrainerControl:
        return TrainerControl(should_stop=state.step == self.step)


def test_a_stopped_full_fine_tune_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, example_dir: Path, full_run: Path
) -> None:
    given = settings(tmp_path, example_dir, train_batch_size=2, eval_seeds=1)
    with one_thread():
        with pytest.raises(TrainingCancelled):
            train(DOPSDConfig.for_preset(**given), [StopAt(4)])
        train(DOPSDConfig.for_preset(**given, resume_from=str(tmp_path)))
    resumed, uninterrupted = transformer_weights(tmp_path), transformer_weights(full_run)
    worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted)
    assert worst <= ATOL


def relative_update_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: Any) -> float:
    """||a - b|| / ||b - base|| over every weight: how far run `a` is from run `b`, as a share of `b`'s training."""
    weights = dict(base.transformer.named_parameters())
    apart = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    moved = sum(float((b[k] - weights[k].detach()).pow(2).sum()) for k in b)
    return (apart / moved) ** 0.5


def test_two_sharded_processes_fine_tune_what_one_process_does_and_resume_on_one(
    tmp_path: Path, example_dir: Path, full_run: Path
) -> None:
    two = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "dopsd", *cli_args(settings(two, example_dir, num_processes=2, eval_seeds=1))],
        capture_output=True, text=True, env=cli_env(), timeout=PACE.patience_s * 4,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    distributed = json.loads((two / "metrics.json").read_text())["distributed"]
    assert distributed["sharded"] is True and distributed["global_batch_size"] == 2
    base = base_family(DOPSDConfig.load(full_run / "config.json"))
    one = transformer_weights(full_run)
    assert relative_update_difference(transformer_weights(two), one, base) < UPDATE_RTOL
    # The sharded run's checkpoint (whole weights and optimizer state by parameter name) resumes on one process.
    resumed = tmp_path / "resumed"
    with one_thread():
        checkpoint = two / "checkpoints" / "step-00000003"
        train(
            DOPSDConfig.for_preset(**settings(resumed, example_dir, train_batch_size=2, resume_from=str(checkpoint)))
        )
    assert relative_update_difference(transformer_weights(resumed), one, base) < UPDATE_RTOL


def test_a_lora_checkpoint_does_not_resume_a_full_fine_tune(tmp_path: Path, example_dir: Path) -> None:
    lora = settings(tmp_path, example_dir, finetune="lora", extract_lora_rank=None, max_train_steps=4)
    with one_thread():
        train(DOPSDConfig.for_preset(**lora))
        with pytest.raises(CheckpointError, match="finetune"):
            train(DOPSDConfig.for_preset(**settings(tmp_path, example_dir, resume_from=str(tmp_path))))


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"finetune": "full", "init_adapter": "earlier/"}, "`init_adapter` continues a LoRA"),
        ({"finetune": "full", "keep": "best"}, "`keep: best` is for LoRA runs"),
        ({"finetune": "lora", "extract_lora_rank": 4}, "`extract_lora_rank` is for `finetune: full`"),
    ],
)
def test_settings_that_mean_nothing_for_a_full_fine_tune_are_refused(given: dict[str, Any], refused: str) -> None:
    assert not validation_errors(DOPSDConfig.for_preset("tiny-z-image", finetune="full"))
    with pytest.raises(ValueError, match=re.escape(refused)):
        DOPSDConfig.for_preset("tiny-z-image", **given)


def test_flux2_klein_fine_tunes_in_full_on_two_sharded_processes(tmp_path: Path, example_dir: Path) -> None:
    """FLUX.2-klein's transformer (double- and single-stream block lists, each block sharded) through the same
    path: the run writes its transformer, which loads, and an adapter of its change."""
    given = settings(tmp_path, example_dir, preset="tiny-flux2-klein", num_processes=2, max_train_steps=2)
    done = subprocess.run(
        [sys.executable, "-m", "dopsd", *cli_args({**given, "checkpointing_steps": 0})],
        capture_output=True, text=True, env=cli_env(), timeout=PACE.patience_s * 4,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    family = base_family(DOPSDConfig.load(tmp_path / "config.json"))
    reloaded = type(family.transformer).from_pretrained(tmp_path, subfolder=TRANSFORMER_FOLDER)
    assert reloaded.state_dict().keys() == family.transformer.state_dict().keys()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["distributed"]["sharded"] is True and metrics["lora_extraction"]["layers"] > 0
