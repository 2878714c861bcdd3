"""The job schema shared by `mixloom train` configs and the API's job-create body.

Torch-free on purpose: the API process validates jobs with it and never imports torch.
Hyperparameter names follow PEFT and MixLoRA. Unknown keys are errors, and so are numbers
that are not finite (`Infinity`, `NaN`, `1e400`, which JSON parsers read as infinity).

A method is an objective and an adapter, spelled one way for every pair (`Method`):

    {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 2},   # training
        "adapter": {"type": "mixlora", "hyperparameters": {"num_experts": 8}}}}

    {"type": "dpo", "dpo": {
        "hyperparameters": {"beta": 0.1, "n_epochs": 1},                       # objective
        "adapter": {"type": "mixlora", "hyperparameters": {"num_experts": 8}}}}

OpenAI's own bodies are those without `adapter` (the deployment's default adapter trains);
mixloom's `{"type": "lora" | "mixlora"}` is
supervised training of that adapter with every hyperparameter in one section.

The bounds below hold everywhere (`mixloom train` too). A deployment bounds the costly ones
further (`limit_problems`, from `config.Settings`; max_steps, checkpoint_every and
keep_checkpoints only there): the API refuses a job over them.
"""

from __future__ import annotations

import math
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
    rendering: Annotated[
        Literal["chat", "plain"],
        Field(
            description='how rows become text: "chat" (default) renders them with the base '
            'model\'s chat template when it has one; "plain" as raw text, prompt + completion '
            "+ EOS (TRL's non-conversational rows; alpaca rows with a short instruction "
            'prompt, chat rows as User:/Assistant: lines). {"text"} rows are always plain. '
            "The adapter records the rendering it trained with, for inference and evaluation"
        ),
    ] = "chat"
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


class LoraAdapterHyperparameters(_Strict):
    """The adapter's own hyperparameters, PEFT's names (training ones are apart)."""

    r: Annotated[int, Field(ge=1, le=1024)] = 8
    lora_alpha: Annotated[float, Field(gt=0, le=65536)] = 16
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: tuple[str, ...] = ALL_MODULES
    use_rslora: bool = False
    use_dora: bool = False
    lora_init: Literal["original", "gaussian"] = "original"

    @model_validator(mode="after")
    def _known_modules(self) -> LoraAdapterHyperparameters:
        bad = [m for m in self.target_modules if m not in ALL_MODULES]
        if bad:
            raise ValueError(f"unknown target_modules {bad}; choose from {list(ALL_MODULES)}")
        if not self.target_modules:
            raise ValueError(f"target_modules is empty; name at least one of {list(ALL_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules lists a module twice")
        return self


class LoraHyperparameters(LoraAdapterHyperparameters, TrainingHyperparameters):
    """A LoRA job's every hyperparameter: training ones first, then the adapter's."""


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


class MixLoraAdapterHyperparameters(LoraAdapterHyperparameters):
    """MixLoRA's own hyperparameters: the attention LoRA's, the experts' and the router's."""

    num_experts: Annotated[int, Field(ge=1, le=64)] = 8
    routing: Routing = Routing.TOP_K
    top_k: Annotated[int, Field(ge=1, le=64)] = 2
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.8
    router_aux_loss_coef: Annotated[float, Field(ge=0, le=100)] = 0.01
    router_init_range: Annotated[float, Field(ge=0, le=10)] = 0.02
    jitter_noise: Annotated[float, Field(ge=0, lt=1)] = 0.0
    expert_lora: ExpertLora = ExpertLora()

    @model_validator(mode="after")
    def _k_fits(self) -> MixLoraAdapterHyperparameters:
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


class MixLoraHyperparameters(MixLoraAdapterHyperparameters, LoraHyperparameters):
    """A MixLoRA job's every hyperparameter: training ones first, then the adapter's."""


AdapterType = Literal["lora", "mixlora"]
DEFAULT_ADAPTER: AdapterType = "lora"  # config.Settings.default_adapter's default
# learning_rate's default: OpenAI's learning_rate_multiplier scales it
BASE_LEARNING_RATE: float = TrainingHyperparameters.model_fields["learning_rate"].default
# OpenAI's hyperparameters that take "auto": it means mixloom's default for that field
AUTO_FIELDS = frozenset({"n_epochs", "batch_size", "learning_rate_multiplier"})
_ADAPTER_FIELDS = frozenset(MixLoraAdapterHyperparameters.model_fields)
_LORA_FIELDS = frozenset(LoraAdapterHyperparameters.model_fields)
_ADAPTER_CLASSES: dict[str, type[LoraAdapterHyperparameters]] = {
    "lora": LoraAdapterHyperparameters,
    "mixlora": MixLoraAdapterHyperparameters,
}
_JOB_CLASSES: dict[str, type[LoraHyperparameters]] = {
    "lora": LoraHyperparameters,
    "mixlora": MixLoraHyperparameters,
}


def _significant(x: float) -> float:
    """12 significant digits: 3 x 2e-4 is 0.0006, not 0.0006000000000000001."""
    return float(f"{x:.12g}")


class SupervisedHyperparameters(TrainingHyperparameters):
    """OpenAI's `supervised` hyperparameters (`n_epochs`, `batch_size`,
    `learning_rate_multiplier`, each also "auto") and mixloom's other training ones. The
    adapter's hyperparameters (`r`, `num_experts`, ...) go in the method's `adapter`."""

    learning_rate_multiplier: Annotated[
        float | None,
        Field(
            gt=0,
            le=10 / BASE_LEARNING_RATE,  # learning_rate's bound
            description=f"OpenAI's name for the learning rate: learning_rate = "
            f"learning_rate_multiplier x {BASE_LEARNING_RATE:g} (mixloom's default "
            'learning_rate). Give this or learning_rate; the job shows both. "auto": 1.',
        ),
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _openai_values(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in AUTO_FIELDS and v == "auto")}
        misplaced = sorted(k for k in data if k in _ADAPTER_FIELDS)
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)}: adapter hyperparameters go in the method's adapter "
                'section, e.g. "adapter": {"type": "lora", "hyperparameters": {"r": 16}}'
            )
        lr, mult = data.get("learning_rate"), data.get("learning_rate_multiplier")
        if _number(mult):
            implied = _significant(mult * BASE_LEARNING_RATE)
            if lr is None:
                data["learning_rate"] = implied
            elif _number(lr) and not math.isclose(lr, implied, rel_tol=1e-9):
                raise ValueError(
                    f"learning_rate ({lr:g}) and learning_rate_multiplier ({mult:g}, which "
                    f"means {implied:g}) disagree; give one of them"
                )
        elif mult is None:
            data["learning_rate_multiplier"] = (
                _significant(lr / BASE_LEARNING_RATE) if _number(lr) and lr > 0 else 1.0
            )
        return data


class DpoHyperparameters(SupervisedHyperparameters):
    """OpenAI's `dpo` hyperparameters (`beta`, `n_epochs`, `batch_size`,
    `learning_rate_multiplier`, each also "auto") and mixloom's other training ones.
    `batch_size` counts preference pairs (each is two sequences: preferred and not)."""

    beta: Annotated[
        float,
        Field(
            gt=0,
            le=100,
            description="how far the policy may move from the reference (the base model with "
            'no adapter): the DPO loss is -log sigmoid(beta x margin). "auto": 0.1',
        ),
    ] = 0.1
    label_smoothing: Annotated[
        float,
        Field(
            ge=0,
            lt=0.5,
            description="mixloom's extension: the assumed share of pairs whose preference is "
            "flipped (conservative DPO): loss = -(1-e) log sigmoid(beta m) - e log sigmoid(-beta m)",
        ),
    ] = 0.0

    @model_validator(mode="before")
    @classmethod
    def _auto_beta(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("beta") == "auto":
            data = {k: v for k, v in data.items() if k != "beta"}
        return data

    @model_validator(mode="after")
    def _completions_only(self) -> DpoHyperparameters:
        if self.train_on_inputs:
            raise ValueError(
                "train_on_inputs: DPO compares the likelihoods of the two answers alone; "
                "leave it false"
            )
        return self

    @property
    def objective(self) -> DpoObjective:
        return DpoObjective(beta=self.beta, label_smoothing=self.label_smoothing)


class DpoObjective(_Strict):
    """What a DPO job's loss needs beyond its training hyperparameters."""

    beta: float = 0.1
    label_smoothing: float = 0.0


_OBJECTIVE_FIELDS = frozenset({"beta", "label_smoothing", "learning_rate_multiplier"})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class AdapterSection(_Strict):
    """mixloom's extension to OpenAI's methods: which adapter a method trains and its
    hyperparameters. Spelled the same inside every method (`supervised` and `dpo`)."""

    type: Annotated[
        AdapterType,
        Field(description='"lora" (PEFT LoRA) or "mixlora" (a mixture of LoRA experts)'),
    ]
    hyperparameters: Annotated[
        MixLoraAdapterHyperparameters,
        Field(
            description="the adapter's hyperparameters by PEFT / MixLoRA names (r, lora_alpha, "
            "lora_dropout, target_modules, ...; MixLoRA also num_experts, top_k, routing, "
            "router_aux_loss_coef, expert_lora, ...); unset ones take their defaults"
        ),
    ] = MixLoraAdapterHyperparameters()

    @model_validator(mode="after")
    def _fields_of_type(self) -> AdapterSection:
        extra = sorted(self.hyperparameters.model_fields_set - _LORA_FIELDS)
        if self.type == "lora" and extra:
            raise ValueError(
                f"{', '.join(extra)}: MixLoRA hyperparameters, but adapter.type is 'lora'; "
                "set it to 'mixlora', or leave them out"
            )
        return self

    @property
    def settings(self) -> LoraAdapterHyperparameters:
        """The hyperparameters of this adapter type alone, every one filled in."""
        chosen = self.hyperparameters.model_dump(
            include=set(_ADAPTER_CLASSES[self.type].model_fields)
        )
        return _ADAPTER_CLASSES[self.type].model_validate(chosen)


class SupervisedMethodBody(_Strict):
    hyperparameters: SupervisedHyperparameters = SupervisedHyperparameters()
    adapter: Annotated[
        AdapterSection | None,
        Field(
            description="mixloom's extension: the adapter to train (default: the deployment's "
            "default adapter, MIXLOOM_DEFAULT_ADAPTER, LoRA unless the operator chose MixLoRA)"
        ),
    ] = None


class DpoMethodBody(_Strict):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()
    adapter: Annotated[
        AdapterSection | None,
        Field(
            description="mixloom's extension: the adapter to train, as in `supervised` "
            "(default: the deployment's default adapter)"
        ),
    ] = None


class LoraMethodBody(_Strict):
    hyperparameters: LoraHyperparameters = LoraHyperparameters()


class MixLoraMethodBody(_Strict):
    hyperparameters: MixLoraHyperparameters = MixLoraHyperparameters()


_SECTIONS: dict[str, type[_Strict]] = {
    "supervised": SupervisedMethodBody,
    "dpo": DpoMethodBody,
    "lora": LoraMethodBody,
    "mixlora": MixLoraMethodBody,
}


class Method(_Strict):
    """How a job trains: an objective and an adapter.

    OpenAI's spelling: `{"type": "supervised" | "dpo", "<type>": {"hyperparameters": {...},
    "adapter": {"type": "lora" | "mixlora", "hyperparameters": {...}}}}`, where
    `hyperparameters` holds the objective's and training ones and `adapter` (mixloom's
    extension, optional) the adapter's. mixloom's shorthand for supervised training:
    `{"type": "lora" | "mixlora", "<type>": {"hyperparameters": {...every one...}}}`.
    """

    type: Annotated[
        Literal["supervised", "dpo", "lora", "mixlora"],
        Field(
            description='"supervised" or "dpo" (OpenAI\'s bodies; the adapter is their '
            "`adapter` section, else the deployment's default), or mixloom's \"lora\" / "
            '"mixlora": supervised training of that adapter with every hyperparameter in one '
            "section"
        ),
    ]
    supervised: SupervisedMethodBody | None = None
    dpo: DpoMethodBody | None = None
    lora: LoraMethodBody | None = None
    mixlora: MixLoraMethodBody | None = None

    @model_validator(mode="after")
    def _body_matches_type(self) -> Method:
        for other in _SECTIONS:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.type is {self.type!r} but a {other!r} section is given")
        return self

    @property
    def objective(self) -> Literal["supervised", "dpo"]:
        return "dpo" if self.type == "dpo" else "supervised"

    @property
    def preference(self) -> DpoObjective | None:
        """A DPO job's loss settings; None for supervised training."""
        if self.type != "dpo":
            return None
        return (self.dpo or DpoMethodBody()).hyperparameters.objective

    def _body(self) -> SupervisedMethodBody | DpoMethodBody:
        """The OpenAI-shaped body (supervised or dpo), defaults where it was left out."""
        if self.type == "dpo":
            return self.dpo or DpoMethodBody()
        return self.supervised or SupervisedMethodBody()

    @property
    def adapter_type(self) -> AdapterType:
        """The adapter this method trains ("lora" when a supervised or dpo body names none)."""
        if self.type in ("supervised", "dpo"):
            adapter = self._body().adapter
            return adapter.type if adapter is not None else DEFAULT_ADAPTER
        return self.type  # type: ignore[return-value]

    @property
    def hyperparameters(self) -> LoraHyperparameters:
        """Every hyperparameter of the job, training and adapter ones together."""
        if self.type == "lora":
            return (self.lora or LoraMethodBody()).hyperparameters
        if self.type == "mixlora":
            return (self.mixlora or MixLoraMethodBody()).hyperparameters
        body = self._body()
        adapter = body.adapter or AdapterSection(type=DEFAULT_ADAPTER)
        training = body.hyperparameters.model_dump(exclude=set(_OBJECTIVE_FIELDS))
        return _JOB_CLASSES[adapter.type].model_validate(
            {**training, **adapter.settings.model_dump()}
        )

    def with_default_adapter(self, adapter: AdapterType) -> Method:
        """This method with the adapter named: a supervised or dpo body without one trains
        `adapter` (the deployment's default); other methods are returned as they are."""
        if self.type not in ("supervised", "dpo") or self._body().adapter:
            return self
        named = self._body().model_copy(update={"adapter": AdapterSection(type=adapter)})
        return self.model_copy(update={self.type: named})

    def within_context(self, context: int) -> Method:
        """This method with max_seq_len lowered to `context` (the base model's) when the
        body left it unset and its default is longer; a value given is kept, and refused
        by the caller if it does not fit."""
        hp = self._section_hyperparameters()
        if "max_seq_len" in hp.model_fields_set:
            return self
        if not 8 <= context < hp.max_seq_len:  # 8: max_seq_len's own lower bound
            return self
        given = hp.model_dump(exclude_unset=True)
        fitted = type(hp).model_validate({**given, "max_seq_len": context})
        if self.type in ("supervised", "dpo"):
            body = self._body().model_copy(update={"hyperparameters": fitted})
            return self.model_copy(update={self.type: body})
        section = LoraMethodBody if self.type == "lora" else MixLoraMethodBody
        return self.model_copy(
            update={self.type: section.model_validate({"hyperparameters": fitted})}
        )

    def _section_hyperparameters(self) -> TrainingHyperparameters:
        """The training hyperparameters as the body gave them (`model_fields_set`: the
        ones it named)."""
        section: Any = getattr(self, self.type) or _SECTIONS[self.type]()
        hp: TrainingHyperparameters = section.hyperparameters
        return hp

    def where(self, name: str) -> str:
        """The path of hyperparameter `name` (e.g. "r", "expert_lora.r") in this body."""
        if self.type not in ("supervised", "dpo"):
            return f"method.{self.type}.hyperparameters.{name}"
        if name.split(".")[0] in _ADAPTER_FIELDS:
            return f"method.{self.type}.adapter.hyperparameters.{name}"
        return f"method.{self.type}.hyperparameters.{name}"

    def to_json(self) -> dict[str, Any]:
        """The method as stored and shown: its own spelling, every hyperparameter filled in."""
        if self.type not in ("supervised", "dpo"):
            hp = self.hyperparameters.model_dump(mode="json")
            return {"type": self.type, self.type: {"hyperparameters": hp}}
        body = self._body()
        adapter = body.adapter or AdapterSection(type=DEFAULT_ADAPTER)
        return {
            "type": self.type,
            self.type: {
                "hyperparameters": body.hyperparameters.model_dump(mode="json"),
                "adapter": {
                    "type": adapter.type,
                    "hyperparameters": adapter.settings.model_dump(mode="json"),
                },
            },
        }

    def openai_hyperparameters(self) -> dict[str, Any]:
        """OpenAI's (older, top-level) `hyperparameters` of a job: n_epochs, batch_size and
        learning_rate_multiplier, whichever spelling the method used."""
        hp = self.hyperparameters
        return {
            "n_epochs": hp.n_epochs,
            "batch_size": hp.batch_size,
            "learning_rate_multiplier": _significant(hp.learning_rate / BASE_LEARNING_RATE),
        }


def method_body(
    objective: str, adapter: AdapterType, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """The method object of a job, from hyperparameters named flat (training, objective and
    adapter ones mixed, as `mixloom jobs create --hp` takes them): supervised training is
    mixloom's shorthand `{"type": adapter, adapter: {"hyperparameters": ...}}`; dpo is
    OpenAI's body with mixloom's adapter section. A dotted name (`expert_lora.r`) sets a
    field of a nested section."""
    nested: dict[str, Any] = {}
    for name, value in hyperparameters.items():
        head, _, field = name.partition(".")
        if field:
            inner = nested.setdefault(head, {})
            if isinstance(inner, dict):
                inner[field] = value
        else:
            nested[name] = value
    hyperparameters = nested
    if objective == "supervised":
        body: dict[str, Any] = {"type": adapter}
        if hyperparameters:
            body[adapter] = {"hyperparameters": hyperparameters}
        return body
    if objective != "dpo":
        raise ValueError(f"objective must be supervised or dpo, got {objective!r}")
    own = {k: v for k, v in hyperparameters.items() if k in _ADAPTER_FIELDS}
    rest = {k: v for k, v in hyperparameters.items() if k not in own}
    return {
        "type": "dpo",
        "dpo": {"hyperparameters": rest, "adapter": {"type": adapter, "hyperparameters": own}},
    }


class EvaluationRequest(_Strict):
    """What a job asks to be evaluated on once it has trained: its adapter and the base model,
    on each task (mixloom/eval). Tasks are built-in names (`arc_easy`, ...) or the ids of the
    tenant's files uploaded with purpose "evals" ({"query", "choices", "gold"} rows)."""

    tasks: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64)]],
        Field(min_length=1, max_length=8),
    ]
    limit: Annotated[int | None, Field(ge=1, le=5000)] = 200  # questions per task; None: all
    protocol: Literal["loglik", "paper", "cloze"] = "loglik"
    num_fewshot: Annotated[int, Field(ge=0, le=25)] = 0  # the loglik protocol's examples


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
                    method.where(name),
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
            method.where("n_epochs"),
            f"{hp.n_epochs} epoch(s) of {rows} rows at batch_size {hp.batch_size} make "
            f"{steps} optimizer steps, more than this deployment allows: at most {bound} "
            f"(MIXLOOM_MAX_JOB_STEPS); set max_steps, fewer n_epochs or a larger batch_size",
        )
    ]
