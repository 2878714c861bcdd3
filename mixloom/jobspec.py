"""The job schema shared by `mixloom train` configs and the API's job-create body.

Torch-free on purpose: the API process validates jobs with it and never imports torch.
Hyperparameter names follow PEFT and MixLoRA. Unknown keys are errors, and so are numbers
that are not finite (`Infinity`, `NaN`, `1e400`, which JSON parsers read as infinity).

The bounds below hold everywhere (`mixloom train` too). A deployment bounds the costly ones
further (`limit_problems`, from `config.Settings`; max_steps, checkpoint_every and
keep_checkpoints only there): the API refuses a job over them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticValidationError

from mixloom.errors import ConfigError, Problem, pydantic_problems

if TYPE_CHECKING:
    from mixloom.config import Settings

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainingHyperparameters(_Strict):
    n_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 8  # sequences per optimizer step
    micro_batch_size: Annotated[int | None, Field(ge=1, le=4096)] = None  # None: = batch_size
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 2e-4
    lr_scheduler: Literal["linear", "constant", "cosine"] = "linear"
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    max_grad_norm: Annotated[float | None, Field(gt=0, le=1e6)] = 1.0  # None: no clipping
    max_seq_len: Annotated[int, Field(ge=8, le=131072)] = 512
    max_steps: Annotated[int | None, Field(ge=1)] = None  # cap on optimizer steps
    train_on_inputs: bool = False  # False: loss only on completion/assistant tokens
    # optimizer steps; None: end only
    checkpoint_every: Annotated[int | None, Field(ge=1)] = None
    # checkpoints kept: the last K plus the best by validation loss; None: the deployment's
    # keep_checkpoints (a job may ask for fewer, never more)
    keep_checkpoints: Annotated[int | None, Field(ge=1)] = None

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainingHyperparameters:
        mb = self.micro_batch_size
        if mb is not None and (mb > self.batch_size or self.batch_size % mb):
            raise ValueError(
                f"micro_batch_size ({mb}) must divide batch_size ({self.batch_size}); "
                "gradient accumulation runs batch_size / micro_batch_size micro-batches"
            )
        return self

    @property
    def micro_batch_rows(self) -> int:
        """Rows of one micro-batch (micro_batch_size, or batch_size when it is unset)."""
        return self.micro_batch_size or self.batch_size

    def total_steps(self, rows: int) -> int:
        """Optimizer steps of a job over `rows` training rows: n_epochs of ceil(rows /
        batch_size) steps, capped by max_steps."""
        total = self.n_epochs * -(-rows // self.batch_size)
        return min(total, self.max_steps) if self.max_steps else total


class LoraHyperparameters(TrainingHyperparameters):
    r: Annotated[int, Field(ge=1, le=1024)] = 8
    lora_alpha: Annotated[float, Field(gt=0, le=65536)] = 16
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: tuple[str, ...] = ALL_MODULES
    use_rslora: bool = False
    use_dora: bool = False
    lora_init: Literal["original", "gaussian"] = "original"

    @model_validator(mode="after")
    def _known_modules(self) -> LoraHyperparameters:
        bad = [m for m in self.target_modules if m not in ALL_MODULES]
        if bad:
            raise ValueError(f"unknown target_modules {bad}; choose from {list(ALL_MODULES)}")
        if not self.target_modules:
            raise ValueError(f"target_modules is empty; name at least one of {list(ALL_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules lists a module twice")
        return self


class ExpertLora(_Strict):
    """LoRA settings of the experts (gate/up/down); unset fields inherit the attention LoRA's."""

    r: Annotated[int | None, Field(ge=1, le=1024)] = None
    lora_alpha: Annotated[float | None, Field(gt=0, le=65536)] = None
    lora_dropout: Annotated[float | None, Field(ge=0, lt=1)] = None
    use_rslora: bool | None = None
    use_dora: bool | None = None


class Routing(StrEnum):
    TOP_K = "top_k"
    TOP_P = "top_p"  # "MixLoRA-Dynamic"
    SWITCH = "switch"  # top-1


class MixLoraHyperparameters(LoraHyperparameters):
    num_experts: Annotated[int, Field(ge=1, le=64)] = 8
    routing: Routing = Routing.TOP_K
    top_k: Annotated[int, Field(ge=1, le=64)] = 2
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.8
    router_aux_loss_coef: Annotated[float, Field(ge=0, le=100)] = 0.01
    router_init_range: Annotated[float, Field(ge=0, le=10)] = 0.02
    jitter_noise: Annotated[float, Field(ge=0, lt=1)] = 0.0
    expert_lora: ExpertLora = ExpertLora()

    @model_validator(mode="after")
    def _k_fits(self) -> MixLoraHyperparameters:
        if self.routing == Routing.TOP_K and self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self

    @property
    def expert_r(self) -> int:
        return self.expert_lora.r or self.r

    @property
    def expert_alpha(self) -> float:
        e = self.expert_lora.lora_alpha
        return self.lora_alpha if e is None else e

    @property
    def expert_dropout(self) -> float:
        e = self.expert_lora.lora_dropout
        return self.lora_dropout if e is None else e

    @property
    def expert_rslora(self) -> bool:
        e = self.expert_lora.use_rslora
        return self.use_rslora if e is None else e

    @property
    def expert_dora(self) -> bool:
        e = self.expert_lora.use_dora
        return self.use_dora if e is None else e


class LoraMethodBody(_Strict):
    hyperparameters: LoraHyperparameters = LoraHyperparameters()


class MixLoraMethodBody(_Strict):
    hyperparameters: MixLoraHyperparameters = MixLoraHyperparameters()


class Method(_Strict):
    type: Literal["lora", "mixlora"]
    lora: LoraMethodBody | None = None
    mixlora: MixLoraMethodBody | None = None

    @model_validator(mode="after")
    def _body_matches_type(self) -> Method:
        other = "mixlora" if self.type == "lora" else "lora"
        if getattr(self, other) is not None:
            raise ValueError(f"method.type is {self.type!r} but a {other!r} section is given")
        return self

    @property
    def hyperparameters(self) -> LoraHyperparameters:
        if self.type == "lora":
            return (self.lora or LoraMethodBody()).hyperparameters
        return (self.mixlora or MixLoraMethodBody()).hyperparameters


class JobSpec(_Strict):
    """One fine-tuning job: the API's create body (file ids) or a `mixloom train` job (paths)."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = "job"
    training_file: str
    validation_file: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    method: Method = Method(type="lora")


def parse_job(data: Any, where: str = "job") -> JobSpec:
    """Validate a job dict, raising ConfigError listing every problem with its path."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping of settings, got {type(data).__name__}", where=where)
    try:
        return JobSpec.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(pydantic_problems(exc, where)) from None


# Hyperparameters a deployment bounds, each by a field of config.Settings (set as
# MIXLOOM_<NAME>): what a job may cost in memory, time and disk.
OPERATOR_BOUNDS: tuple[tuple[str, str], ...] = (
    ("r", "max_lora_r"),
    ("expert_lora.r", "max_lora_r"),
    ("num_experts", "max_experts"),
    ("batch_size", "max_batch_size"),
    ("n_epochs", "max_epochs"),
    ("max_seq_len", "max_seq_len"),
    ("max_steps", "max_job_steps"),
    ("checkpoint_every", "max_job_steps"),
    ("keep_checkpoints", "keep_checkpoints"),  # a job may keep fewer, never more
)


def limit_problems(method: Method, settings: Settings) -> list[Problem]:
    """Every hyperparameter of `method` over the deployment's bound, each naming its path,
    its value, the bound and the setting that sets it."""
    hp: Any = method.hyperparameters
    problems = []
    for name, setting in OPERATOR_BOUNDS:
        value = hp
        for part in name.split("."):
            value = getattr(value, part, None)
        bound = getattr(settings, setting)
        if isinstance(value, int) and value > bound:
            problems.append(
                Problem(
                    f"method.{method.type}.hyperparameters.{name}",
                    f"{value} is more than this deployment allows: at most {bound} "
                    f"(MIXLOOM_{setting.upper()})",
                )
            )
    return problems


def steps_problems(method: Method, settings: Settings, rows: int) -> list[Problem]:
    """The job's optimizer steps over `rows` training rows, if more than max_job_steps."""
    hp = method.hyperparameters
    steps, bound = hp.total_steps(rows), settings.max_job_steps
    if steps <= bound:
        return []
    return [
        Problem(
            f"method.{method.type}.hyperparameters.n_epochs",
            f"{hp.n_epochs} epoch(s) of {rows} rows at batch_size {hp.batch_size} make "
            f"{steps} optimizer steps, more than this deployment allows: at most {bound} "
            f"(MIXLOOM_MAX_JOB_STEPS); set max_steps, fewer n_epochs or a larger batch_size",
        )
    ]
